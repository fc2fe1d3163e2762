"""Prometheus metrics of a serving process: request latencies as histograms, engine state read at scrape time.

Two sources, kept apart on purpose:
- per-request latencies (TTFT, inter-token, end-to-end) and finish reasons are observed
  as outputs reach the event loop (``ServerMetrics`` is the async engine's observer);
- engine state and totals (running/waiting, KV usage, prefix-cache hits, preemptions,
  token counters) already live in the engine's ``EngineStats``; a custom collector reads
  the latest snapshot when /metrics is scraped, so no number is counted twice.

Each ``ServerMetrics`` owns its registry (no process-global state), so several servers
or tests can live in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "splitfuse:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets in seconds: CPU engines are slow and GPU ones fast, so span both.
_TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS_S = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                  0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS_S = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                  50.0, 60.0, 120.0, 240.0, 480.0, 960.0)

# EngineStats field -> (metric name without prefix, kind, help). Counters get "_total" added by the client lib.
_ENGINE_STATS_METRICS = (
    ("num_running", "num_requests_running", "gauge", "Requests in the running batch."),
    ("num_waiting", "num_requests_waiting", "gauge", "Requests waiting to be scheduled."),
    ("num_free_blocks", "num_free_kv_blocks", "gauge",
     "KV cache blocks not held by any request (cached-but-free prefix blocks count as free)."),
    ("num_total_blocks", "num_total_kv_blocks", "gauge", "KV cache blocks in the pool."),
    ("kv_cache_usage", "kv_cache_usage_perc", "gauge", "Fraction of KV cache blocks in use (0..1)."),
    ("prefix_cache_queries", "prefix_cache_queries", "counter", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "prefix_cache_hits", "counter", "Prompt tokens found in the prefix cache."),
    ("num_preemptions", "num_preemptions", "counter", "Requests preempted to free KV cache."),
    ("prompt_tokens_total", "prompt_tokens", "counter", "Prompt tokens processed (prefilled)."),
    ("generation_tokens_total", "generation_tokens", "counter", "Tokens generated."),
    ("spec_draft_tokens_total", "spec_decode_num_draft_tokens", "counter",
     "Speculative decoding: draft tokens verified."),
    ("spec_accepted_tokens_total", "spec_decode_num_accepted_tokens", "counter",
     "Speculative decoding: draft tokens accepted."),
)


class _EngineStatsCollector(Collector):
    """Turns the latest ``EngineStats`` snapshot into metric families at scrape time."""

    def __init__(self, get_stats: Callable[[], Any], get_loop_totals: Optional[Callable[[], tuple[int, float]]]) -> None:
        self._get_stats = get_stats
        self._get_loop_totals = get_loop_totals

    def collect(self) -> Iterator[Metric]:
        if self._get_loop_totals is not None:
            num_steps, step_s = self._get_loop_totals()
            yield CounterMetricFamily(PREFIX + "engine_steps", "Engine steps run.", value=num_steps)
            yield CounterMetricFamily(PREFIX + "engine_step_seconds",
                                      "Wall time spent inside engine steps; its rate is the engine's busy fraction.",
                                      value=step_s)
        stats = self._get_stats()
        if stats is None:
            return
        for field, name, kind, documentation in _ENGINE_STATS_METRICS:
            value = getattr(stats, field, None)
            if value is None:
                continue
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(PREFIX + name, documentation, value=float(value))
        queries = getattr(stats, "prefix_cache_queries", 0) or 0
        hits = getattr(stats, "prefix_cache_hits", 0) or 0
        yield GaugeMetricFamily(PREFIX + "prefix_cache_hit_rate",
                                "Prefix-cache hits / queries (prompt tokens) since start; 0 before any query.",
                                value=hits / queries if queries else 0.0)
        yield from _replica_metrics(stats)


def _replica_metrics(stats: Any) -> Iterator[Metric]:
    """With --replicas: each replica up or down, and the router's decisions by reason."""
    replicas_up = getattr(stats, "replicas_up", None)
    if replicas_up is None:
        return
    up = GaugeMetricFamily(PREFIX + "replica_up", "1 while the engine replica is running.", labels=["replica"])
    for replica, is_up in replicas_up.items():
        up.add_metric([replica], 1.0 if is_up else 0.0)
    yield up
    decisions = CounterMetricFamily(PREFIX + "routing_decisions", "Requests routed to a replica, by the reason.",
                                    labels=["reason"])
    for reason, count in sorted((getattr(stats, "routing_decisions", None) or {}).items()):
        decisions.add_metric([reason], float(count))
    yield decisions


class ServerMetrics:
    """The /metrics of one server; implements the async engine's ``RequestObserver``."""

    def __init__(self, get_stats: Callable[[], Any], model_name: str = "",
                 get_loop_totals: Optional[Callable[[], tuple[int, float]]] = None) -> None:
        """``get_stats``: the latest EngineStats; ``get_loop_totals``: (steps run, seconds inside steps)."""
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name} if model_name else {}
        label_names = list(labels)
        self._request_success = Counter(
            PREFIX + "request_success", "Finished requests by finish reason (stop, length, abort).",
            label_names + ["finished_reason"], registry=self.registry)
        self._ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "Request arrival to first output token (queueing included).",
            label_names, buckets=_TTFT_BUCKETS_S, registry=self.registry)
        self._itl = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between two consecutive output tokens of a request.",
            label_names, buckets=_ITL_BUCKETS_S, registry=self.registry)
        self._e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Request arrival to its last token.",
            label_names, buckets=_E2E_BUCKETS_S, registry=self.registry)
        self._rejected = Counter(
            PREFIX + "request_rejected", "Requests refused before running, by reason.",
            label_names + ["reason"], registry=self.registry)
        self._labels = labels
        self.registry.register(_EngineStatsCollector(get_stats, get_loop_totals))

    # RequestObserver
    def on_first_token(self, ttft_s: float) -> None:
        self._ttft.labels(**self._labels).observe(ttft_s)

    def on_inter_token(self, itl_s: float) -> None:
        self._itl.labels(**self._labels).observe(itl_s)

    def on_finished(self, finish_reason: str, e2e_s: float) -> None:
        self._request_success.labels(**self._labels, finished_reason=finish_reason).inc()
        self._e2e.labels(**self._labels).observe(e2e_s)

    def on_rejected(self, reason: str) -> None:
        """A request refused before it ran, e.g. ``queue_full`` or ``invalid``."""
        self._rejected.labels(**self._labels, reason=reason).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


def parse_metrics(text: str) -> dict[str, float]:
    """Flat ``{"name{label=value,...}": value}`` view of an exposition; handy in tests and scripts.

    ``'splitfuse:num_requests_running 0.0'`` -> ``{"splitfuse:num_requests_running": 0.0}``.
    """
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values

