"""The upstream OpenAI servers of `splitfuse router`: their health, circuit breakers and load, and the one HTTP client.

A backend is routable when its health checks say it is up and its circuit breaker lets a
request through. The two watch different things on purpose:

- health: ``GET /health`` every ``health_interval_s``; ``fail_after`` consecutive failures
  mark it down, ``recover_after`` consecutive successes bring it back, so a restarted server
  rejoins by itself. The first check decides alone, so the router starts (and routes at
  once) whatever mix of backends is up.
- breaker: requests that could not even connect. ``breaker_failures`` of them in a row open
  it for ``breaker_cooldown_s``; then it is half-open and lets one trial request through,
  which closes it on an answer or opens it again. This reacts between two health rounds.

Load comes from the backend's ``/metrics`` each health round (splitfuse, vLLM, llama-server
gauges); a server that exports none keeps zeros. ``in_flight`` is the router's own count,
never reset by a health round (SGLang's router did, and made hot spots).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import aiohttp

from splitfuse.metrics.prometheus import PREFIX as SPLITFUSE_PREFIX
from splitfuse.router.types import ReplicaLoad

logger = logging.getLogger(__name__)

# uvicorn closes idle keep-alive connections after 5 s; dropping ours first means a request never
# goes out on a socket the backend is closing (which would look like a dead backend).
_KEEPALIVE_EXPIRY_S = 4.0

# ReplicaLoad field -> the gauges that carry it, by server. Series of one name are summed
# (vLLM exports one per engine), except KV usage, where the fullest engine counts.
_LOAD_GAUGES: dict[str, tuple[str, ...]] = {
    "num_waiting": (SPLITFUSE_PREFIX + "num_requests_waiting", "vllm:num_requests_waiting",
                    "llamacpp:requests_deferred"),
    "num_running": (SPLITFUSE_PREFIX + "num_requests_running", "vllm:num_requests_running",
                    "llamacpp:requests_processing"),
    "kv_cache_usage": (SPLITFUSE_PREFIX + "kv_cache_usage_perc", "vllm:kv_cache_usage_perc",
                       "vllm:gpu_cache_usage_perc", "llamacpp:kv_cache_usage_ratio"),
}


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class BackendConfig:
    health_interval_s: float = _help("Seconds between two health checks of every backend (GET /health, "
                                     "then /metrics for its load).", default=2.0)
    health_timeout_s: float = _help("A health check slower than this fails (seconds).", default=2.0)
    fail_after: int = _help("Consecutive failed health checks that mark a backend down.", default=3)
    recover_after: int = _help("Consecutive passed health checks that bring a down backend back.", default=2)
    breaker_failures: int = _help("Consecutive requests that cannot connect to a backend before its circuit "
                                  "breaker opens.", default=3)
    breaker_cooldown_s: float = _help("How long an open circuit breaker keeps requests away before one trial "
                                      "request (seconds).", default=5.0)
    connect_timeout_s: float = _help("Longest wait to connect to a backend; then the request tries another "
                                     "(seconds).", default=2.0)
    request_timeout_s: float = _help("Longest wait for a backend's response, and between two chunks of a "
                                     "stream (seconds).", default=600.0)

    def __post_init__(self) -> None:
        for name in ("fail_after", "recover_after", "breaker_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("health_interval_s", "health_timeout_s", "connect_timeout_s", "request_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.breaker_cooldown_s < 0:
            raise ValueError(f"breaker_cooldown_s must be >= 0, got {self.breaker_cooldown_s}")


class Backend:
    """One upstream base URL (``http://host:port``, no ``/v1``) and what the router knows of it."""

    def __init__(self, url: str, config: BackendConfig) -> None:
        self.url = url.rstrip("/")
        self.config = config
        self.up = False
        self.in_flight = 0
        self.load = ReplicaLoad(replica_id=self.url)  # num_waiting, num_running, kv_cache_usage as scraped
        self._checked = False
        self._health_failures = 0
        self._health_successes = 0
        self._connect_failures = 0
        self._breaker_open_until_s: Optional[float] = None  # None: closed
        self._trial_in_flight = False

    # ----- circuit breaker ------------------------------------------------------------------

    def breaker_state(self, now_s: float) -> str:
        if self._breaker_open_until_s is None:
            return "closed"
        return "open" if now_s < self._breaker_open_until_s else "half_open"

    def routable(self, now_s: float) -> bool:
        state = self.breaker_state(now_s)
        return self.up and (state == "closed" or (state == "half_open" and not self._trial_in_flight))

    def acquire(self, now_s: float) -> None:
        """A request is being sent here; in a half-open breaker it is the one trial."""
        self.in_flight += 1
        if self.breaker_state(now_s) == "half_open":
            self._trial_in_flight = True

    def release(self) -> None:
        self.in_flight -= 1

    def abandon_trial(self) -> None:
        """The request went away before it got an answer (its client left): a later one may be the trial."""
        self._trial_in_flight = False

    def on_answered(self) -> None:
        """The backend sent a response (any status): it is reachable, so the breaker closes."""
        self._connect_failures = 0
        self._breaker_open_until_s = None
        self._trial_in_flight = False

    def on_connect_failure(self, now_s: float) -> None:
        """A request got no response at all (refused, reset, dropped before a byte came back)."""
        self._connect_failures += 1
        failed_trial = self._trial_in_flight
        self._trial_in_flight = False
        if failed_trial or self._connect_failures >= self.config.breaker_failures:
            self._breaker_open_until_s = now_s + self.config.breaker_cooldown_s

    # ----- health ----------------------------------------------------------------------------

    def on_health(self, ok: bool) -> bool:
        """Records one health check; True when it marked the backend down (it was up, or unknown)."""
        first, self._checked = not self._checked, True
        if ok:
            self._health_successes, self._health_failures = self._health_successes + 1, 0
            if not self.up and (first or self._health_successes >= self.config.recover_after):
                self.up = True
                self.on_answered()  # a restarted server owes nothing to its predecessor's failures
                logger.info("backend %s is up", self.url)
            return False
        self._health_successes, self._health_failures = 0, self._health_failures + 1
        if first or (self.up and self._health_failures >= self.config.fail_after):
            self.up = False
            logger.warning("backend %s is down", self.url)
            return True
        return False

    def replica_load(self, now_s: float, healthy: bool = True) -> ReplicaLoad:
        """A fresh snapshot for a policy; ``healthy`` False also hides it (a retry skips backends it tried)."""
        return dataclasses.replace(self.load, healthy=healthy and self.routable(now_s), in_flight=self.in_flight)

    def status(self, now_s: float) -> dict[str, Any]:
        """What ``/health`` reports of it."""
        return {"url": self.url, "up": self.up, "in_flight": self.in_flight, "breaker": self.breaker_state(now_s),
                "num_waiting": self.load.num_waiting, "num_running": self.load.num_running,
                "kv_cache_usage": self.load.kv_cache_usage}


def parse_load(metrics_text: str) -> dict[str, float]:
    """The load gauges found in a Prometheus exposition, as ReplicaLoad field values; ValueError if it is not one.

    ``'vllm:num_requests_running{engine="0"} 3\\nvllm:num_requests_running{engine="1"} 2'`` -> ``{"num_running": 5}``.
    """
    from prometheus_client.parser import text_string_to_metric_families

    by_name: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            by_name.setdefault(sample.name, []).append(sample.value)
    load: dict[str, float] = {}
    for field_name, names in _LOAD_GAUGES.items():
        name = next((n for n in names if n in by_name), None)
        if name is not None:
            values = by_name[name]
            load[field_name] = max(values) if field_name == "kv_cache_usage" else sum(values)
    return load


class BackendPool:
    """The backends, their health loop and the shared keep-alive client that forwards requests to them."""

    def __init__(self, urls: Sequence[str], config: BackendConfig = BackendConfig(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not urls:
            raise ValueError("at least one backend URL is needed")
        self.config = config
        self.backends = [Backend(url, config) for url in urls]
        if len({b.url for b in self.backends}) != len(self.backends):
            raise ValueError(f"a backend URL is given twice: {list(urls)}")
        self._by_url = {backend.url: backend for backend in self.backends}
        self._clock = clock
        self._client: Optional[aiohttp.ClientSession] = None
        self._health_task: Optional[asyncio.Task] = None
        self._on_down: Callable[[str], None] = lambda _: None

    @property
    def client(self) -> aiohttp.ClientSession:
        assert self._client is not None, "BackendPool.start() was not called"
        return self._client

    def now_s(self) -> float:
        return self._clock()

    def get(self, url: str) -> Backend:
        return self._by_url[url]

    def loads(self, exclude: Collection[str] = ()) -> list[ReplicaLoad]:
        """Every backend, in order, with ``healthy`` False where it is not routable now or in ``exclude``."""
        now_s = self.now_s()
        return [b.replica_load(now_s, healthy=b.url not in exclude) for b in self.backends]

    async def start(self, on_down: Callable[[str], None] = lambda _: None) -> None:
        """Opens the client, checks every backend once (so the first request finds them known), starts the loop.

        ``on_down(url)`` is called each time a backend is marked down (a policy forgets its cache).
        """
        # No total limit: a stream lasts as long as its answer; sock_read bounds each wait for bytes.
        timeout = aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout_s,
                                        sock_read=self.config.request_timeout_s)
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=_KEEPALIVE_EXPIRY_S)
        # Bodies are relayed as they come, never decoded (the router asks backends for identity encoding).
        self._client = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                             trust_env=False)
        self._on_down = on_down
        await self.check_all()
        self._health_task = asyncio.create_task(self._health_loop(), name="splitfuse-router-health")

    async def aclose(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._client is not None:
            await self._client.close()

    async def check_all(self) -> None:
        """One health round: every backend's ``/health``, and ``/metrics`` of those that passed, concurrently."""
        await asyncio.gather(*(self._check(backend) for backend in self.backends))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self.check_all()
            except Exception:  # a bug here must not stop the checks (and freeze every backend's state)
                logger.exception("health round failed")

    async def _check(self, backend: Backend) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.health_timeout_s)
        try:
            async with self.client.get(backend.url + "/health", timeout=timeout) as response:
                ok = response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            ok = False
        if backend.on_health(ok):
            self._on_down(backend.url)
        if ok:
            await self._scrape_load(backend, timeout)

    async def _scrape_load(self, backend: Backend, timeout: aiohttp.ClientTimeout) -> None:
        """Replaces the backend's load gauges by its ``/metrics``; any failure keeps the previous values."""
        try:
            async with self.client.get(backend.url + "/metrics", timeout=timeout) as response:
                if response.status != 200:
                    return
                values = parse_load(await response.text())
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return
        backend.load = ReplicaLoad(replica_id=backend.url, num_waiting=int(values.get("num_waiting", 0)),
                                   num_running=int(values.get("num_running", 0)),
                                   kv_cache_usage=float(values.get("kv_cache_usage", 0.0)))
