"""Benchmark metrics from per-request timestamps: TTFT, TBT, TPOT, E2E, throughput, effective throughput, SLO attainment, fluidity-index.

Definitions follow /work/shared/DESIGN.md; each function's docstring says exactly
what it computes. Percentiles use numpy's default (linear interpolation between
closest ranks). Latency statistics cover the requests that succeeded; failed
requests are counted (``num_errors``, ``num_timeouts``, ``error_counts``) and
count as misses in every pass/fail metric.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from splitfuse.bench.records import RequestRecord

# FastGen's prefill SLA: a prompt of P tokens may take P / 512 seconds to first token.
FASTGEN_PROMPT_TOKENS_PER_S = 512.0
FASTGEN_EMA_SPAN = 16
FASTGEN_TARGET_RATES = (2.0, 4.0, 6.0)
GOODPUT_ATTAINMENT = 0.9

# A latency exactly at its limit must pass even after float rounding
# (e.g. an EMA of equal 0.25 s gaps can come out as 0.25000000000000006).
_REL_TOLERANCE = 1e-9


def _within(value: float, limit: float) -> bool:
    return value <= limit * (1.0 + _REL_TOLERANCE) + 1e-12


def latency_stats(values: Iterable[float]) -> Optional[dict[str, float]]:
    """mean, p50, p90, p99, max of ``values`` (seconds); None when there are none."""
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        return None
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {
        "mean": float(array.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(array.max()),
    }


def run_duration_s(records: Sequence[RequestRecord]) -> float:
    """First send to the last moment any request ended (its last token, or its failure)."""
    if not records:
        return 0.0
    start = min(record.send_time_s for record in records)
    ends = [_end_time(record) for record in records]
    return max(ends) - start


def _end_time(record: RequestRecord) -> float:
    candidates = [record.send_time_s]
    if record.token_times_s:
        candidates.append(record.token_times_s[-1])
    if record.end_time_s is not None:
        candidates.append(record.end_time_s)
    return max(candidates)


# ---------------------------------------------------------------- effective throughput


def ema(values: Sequence[float], span: int = FASTGEN_EMA_SPAN) -> list[float]:
    """Bias-corrected exponential moving average with alpha = 2 / (span + 1).

    Point t is sum_i (1-alpha)^(t-i) x_i / sum_i (1-alpha)^(t-i) over i <= t — the
    form pandas' ``Series.ewm(span=span).mean()`` computes, which FastGen's
    benchmark uses. The first point equals the first value.
    [0.1, 0.1, 0.1] -> [0.1, 0.1, 0.1]
    """
    decay = 1.0 - 2.0 / (span + 1.0)
    weighted_sum = 0.0
    weight_total = 0.0
    averages = []
    for value in values:
        weighted_sum = value + decay * weighted_sum
        weight_total = 1.0 + decay * weight_total
        averages.append(weighted_sum / weight_total)
    return averages


def passes_fastgen_sla(
    record: RequestRecord,
    target_tokens_per_s: float,
    prompt_tokens_per_s: float = FASTGEN_PROMPT_TOKENS_PER_S,
    ema_span: int = FASTGEN_EMA_SPAN,
) -> bool:
    """DeepSpeed-FastGen's per-request SLA for a target generation rate r tokens/s.

    A request passes when it succeeded and
      1. TTFT <= prompt_tokens / 512 s (``prompt_tokens`` is the prompt length the
         client sent, before any chat template), and
      2. every point of ``ema(per-token latencies, span=16)`` is <= 1 / r s.
    The per-token latency sequence is the request's TBT gaps: the time between
    consecutive text-carrying SSE chunks, [t1-t0, t2-t1, ...]; the first token's
    latency (TTFT) is judged only by rule 1. A request with one output token has
    no gaps and is judged by rule 1 alone. (FastGen's reference code uses a
    strict < in rule 2; we use <=, so a latency exactly at the limit passes.)
    """
    ttft = record.ttft_s
    if not record.ok or ttft is None:
        return False
    if not _within(ttft, record.prompt_tokens / prompt_tokens_per_s):
        return False
    limit_s = 1.0 / target_tokens_per_s
    return all(_within(average, limit_s) for average in ema(record.tbt_gaps_s, ema_span))


def effective_throughput(
    records: Sequence[RequestRecord],
    duration_s: float,
    target_tokens_per_s: float,
    prompt_tokens_per_s: float = FASTGEN_PROMPT_TOKENS_PER_S,
) -> dict[str, float]:
    """FastGen's effective throughput: requests/s × fraction of requests that pass.

    Both factors count every request, failed ones included (they fail the SLA),
    so the product is (requests that passed) / duration_s.
    """
    if not records or duration_s <= 0:
        return {"pass_fraction": 0.0, "requests_per_s": 0.0}
    passed = sum(passes_fastgen_sla(r, target_tokens_per_s, prompt_tokens_per_s) for r in records)
    return {"pass_fraction": passed / len(records), "requests_per_s": passed / duration_s}


# ---------------------------------------------------------------- SLO attainment (goodput)


@dataclass(frozen=True)
class Slo:
    """DistServe-style per-request latency objectives, in seconds."""

    ttft_s: float
    tpot_s: float


def meets_slo(record: RequestRecord, slo: Slo) -> bool:
    """Succeeded, TTFT <= slo.ttft_s and TPOT <= slo.tpot_s (TPOT waived for 1-token outputs)."""
    ttft, tpot = record.ttft_s, record.tpot_s
    if not record.ok or ttft is None or not _within(ttft, slo.ttft_s):
        return False
    return tpot is None or _within(tpot, slo.tpot_s)


def slo_attainment(records: Sequence[RequestRecord], slo: Slo) -> float:
    """Fraction of all requests (failed ones count as misses) that meet ``slo``."""
    if not records:
        return 0.0
    return sum(meets_slo(record, slo) for record in records) / len(records)


# ---------------------------------------------------------------- fluidity-index (Etalon)


def fluidity_deadlines(
    send_time_s: float,
    token_times_s: Sequence[float],
    prefill_deadline_s: float,
    decode_deadline_s: float,
    count_missed_periods: bool = True,
) -> tuple[int, int]:
    """(deadlines met, deadlines total) for one request, as Etalon defines them.

    The first token is due at send + prefill_deadline; each next token is due one
    decode_deadline after the previous *deadline* — so a token that comes early
    banks slack that later tokens may use (slack carried forward). A token that
    comes after its deadline resets the schedule: the next deadline is its actual
    arrival + decode_deadline, and banked slack is lost.

    Etalon counts a stall as several misses: a token arriving late by L seconds
    misses 1 + floor(L / decode_deadline) deadlines (every decode period that went
    by without a token). ``count_missed_periods=False`` counts one miss per token.
    With D_p = 1, D_d = 0.5, send at 0 and tokens at [0.5, 1.0, 2.6, 3.0]:
    due 1.0 (met), 1.5 (met), 2.0 (late by 0.6: 2 misses, reset), 3.1 (met) -> (3, 5).
    """
    met = total = 0
    deadline = send_time_s + prefill_deadline_s
    for arrival in token_times_s:
        if _within(arrival - send_time_s, deadline - send_time_s):
            met += 1
            total += 1
            deadline += decode_deadline_s
            continue
        lateness = arrival - deadline
        missed = 1 + int(math.floor(lateness / decode_deadline_s)) if count_missed_periods else 1
        total += missed
        deadline = arrival + decode_deadline_s
    return met, total


def fluidity_index(
    records: Sequence[RequestRecord], prefill_deadline_s: float, decode_deadline_s: float
) -> Optional[dict[str, float]]:
    """Pooled fluidity-index (deadlines met / deadlines total over all successful
    requests) and the mean of the per-request indexes; None without successful requests."""
    met_total = deadline_total = 0
    per_request = []
    for record in records:
        if not record.ok or not record.token_times_s:
            continue
        met, total = fluidity_deadlines(
            record.send_time_s, record.token_times_s, prefill_deadline_s, decode_deadline_s
        )
        met_total += met
        deadline_total += total
        per_request.append(met / total)
    if deadline_total == 0:
        return None
    return {
        "prefill_deadline_s": prefill_deadline_s,
        "decode_deadline_s": decode_deadline_s,
        "index": met_total / deadline_total,
        "mean_request_index": float(np.mean(per_request)),
    }


# ---------------------------------------------------------------- one run's summary


def summarize(
    records: Sequence[RequestRecord],
    duration_s: Optional[float] = None,
    effective_rates: Sequence[float] = FASTGEN_TARGET_RATES,
    slo: Optional[Slo] = None,
    fluidity_deadlines_s: Optional[tuple[float, float]] = None,
) -> dict:
    """Every metric of one run as a JSON-ready dict (times in seconds).

    Throughputs divide by ``duration_s`` (default: first send to last end) and
    count the tokens of successful requests only: output_tokens_per_s,
    total_tokens_per_s (prompt + output), requests_per_s.
    """
    if duration_s is None:
        duration_s = run_duration_s(records)
    succeeded = [record for record in records if record.ok]
    output_tokens = sum(record.output_tokens for record in succeeded)
    prompt_tokens = sum(record.prompt_tokens for record in succeeded)
    per_s = (lambda count: count / duration_s) if duration_s > 0 else (lambda count: 0.0)
    summary = {
        "num_requests": len(records),
        "num_succeeded": len(succeeded),
        "num_errors": len(records) - len(succeeded),
        "num_timeouts": sum(record.timed_out for record in records),
        "error_counts": dict(Counter(_error_kind(r.error) for r in records if not r.ok)),
        "duration_s": duration_s,
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "requests_per_s": per_s(len(succeeded)),
        "output_tokens_per_s": per_s(output_tokens),
        "total_tokens_per_s": per_s(prompt_tokens + output_tokens),
        "ttft_s": latency_stats(r.ttft_s for r in succeeded if r.ttft_s is not None),
        "tbt_s": latency_stats(gap for r in succeeded for gap in r.tbt_gaps_s),
        "tpot_s": latency_stats(r.tpot_s for r in succeeded if r.tpot_s is not None),
        "e2e_s": latency_stats(r.e2e_s for r in succeeded if r.e2e_s is not None),
        "output_tokens_source": dict(Counter(r.output_tokens_source for r in succeeded)),
        "effective_throughput": {
            f"{rate:g}": effective_throughput(records, duration_s, rate) for rate in effective_rates
        },
        "slo": None,
        "fluidity": None,
    }
    if slo is not None:
        summary["slo"] = {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s,
                          "attainment": slo_attainment(records, slo)}
    if fluidity_deadlines_s is not None:
        summary["fluidity"] = fluidity_index(records, *fluidity_deadlines_s)
    return summary


def _error_kind(error: Optional[str]) -> str:
    # "HTTP 500: {...long body...}" -> "HTTP 500", so identical failures group together.
    return (error or "").split(":", 1)[0][:80]
