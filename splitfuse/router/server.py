"""The `splitfuse router` HTTP app: each OpenAI request routed by a policy to one backend and relayed as it comes.

Per request: the body is read once for its routing keys (a 400 if it is not JSON), the policy
picks a routable backend, and the request goes there with its body bytes untouched. What comes
back is passed through: status, headers and body as they are, an SSE stream chunk by chunk as
the chunks arrive. A request that got no byte back (refused, reset, dropped) was not started,
so it is sent to another routable backend, each backend tried at most once; once a byte came
back it stays where it is. A stream that breaks midway goes on on another backend from the text
already streamed (resume.py), so the client's stream goes on; where it cannot (no other backend,
several choices, a prompt of token ids), it ends with one OpenAI error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from splitfuse.entrypoints.openai.errors import OpenAIError, error_body, install_error_handlers, json_error
from splitfuse.entrypoints.openai.json_body import parse_json_body
from splitfuse.metrics.prometheus import CONTENT_TYPE
from splitfuse.router.backends import Backend, BackendPool
from splitfuse.router.resume import (NotResumable, StreamLog, continuation_body, continuation_rewriter, finish_events,
                                     progress_of)
from splitfuse.router.types import RouteRequest, RoutingPolicy

logger = logging.getLogger(__name__)

PREFIX = "splitfuse_router:"
SESSION_HEADER = "x-session-id"

# Hop-by-hop headers (RFC 9110 7.6.1) and those each side's HTTP layer writes itself.
_DROP_REQUEST_HEADERS = frozenset({"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te",
                                   "upgrade", "proxy-connection", "proxy-authorization", "accept-encoding"})
_DROP_RESPONSE_HEADERS = frozenset({"content-length", "connection", "keep-alive", "transfer-encoding", "date",
                                    "server"})
# Asking backends for uncompressed bodies lets the router relay bytes without decoding or re-negotiating them.
_UPSTREAM_ENCODING = {"accept-encoding": "identity"}
_GENERATION_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
MAX_BODY_BYTES = 32 << 20  # a request body the router reads whole before routing it
# What breaks off a response midway: the connection (reset, closed, a bad frame) or a wait for bytes too long.
_BROKEN_OFF_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


# ----- routing keys ------------------------------------------------------------------------------


def render_history(messages: Any) -> str:
    """A chat's whole history as text, so a follow-up turn extends the text of the turn before it.

    ``[{"role": "system", "content": "Be terse."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]``
    -> ``"system: Be terse.\\nuser: Hi\\n"``. Parts that are not text (images) add nothing.
    """
    if not isinstance(messages, list):
        return ""
    lines = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content
                              if isinstance(part, dict) and isinstance(part.get("text"), str))
        lines.append(f"{message.get('role', '')}: {content if isinstance(content, str) else ''}\n")
    return "".join(lines)


def route_request_of(kind: str, body: Any, headers: Mapping[str, str]) -> RouteRequest:
    """The routing keys of a ``completions`` or ``chat`` body (anything else routes on no key).

    A completion routes on its prompt: the text, or the token ids when it is a list of ints; a
    batch of prompts routes on its first. A session is the ``X-Session-ID`` header, else ``user``.
    """
    session_key = headers.get(SESSION_HEADER) or None
    if not isinstance(body, dict):
        return RouteRequest(session_key=session_key)
    if session_key is None and isinstance(body.get("user"), str) and body["user"]:
        session_key = body["user"]
    if kind == "chat":
        return RouteRequest(text=render_history(body.get("messages")), session_key=session_key)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return RouteRequest(text=prompt, session_key=session_key)
    if isinstance(prompt, list) and prompt and all(type(token) is int for token in prompt):
        return RouteRequest(token_ids=prompt, session_key=session_key)
    return RouteRequest(session_key=session_key)


# ----- metrics -------------------------------------------------------------------------------------


class _PoolCollector(Collector):
    """Each backend's state, read from the pool when /metrics is scraped (so it is never stale or counted twice)."""

    def __init__(self, pool: BackendPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        now_s = self._pool.now_s()
        up = GaugeMetricFamily(PREFIX + "backend_up", "1 if the backend passes its health checks.", labels=["backend"])
        routable = GaugeMetricFamily(PREFIX + "backend_routable",
                                     "1 if requests may go to the backend now (up, circuit breaker not open).",
                                     labels=["backend"])
        in_flight = GaugeMetricFamily(PREFIX + "backend_in_flight",
                                      "Requests the router sent to the backend that have not finished.",
                                      labels=["backend"])
        for backend in self._pool.backends:
            up.add_metric([backend.url], float(backend.up))
            routable.add_metric([backend.url], float(backend.routable(now_s)))
            in_flight.add_metric([backend.url], float(backend.in_flight))
        yield from (up, routable, in_flight)


class RouterMetrics:
    """The router's /metrics, in a registry of its own (several routers and servers can share a process)."""

    def __init__(self, pool: BackendPool) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(PREFIX + "decisions", "Routing decisions, by policy and reason.",
                                 ["policy", "reason"], registry=self.registry)
        self.requests = Counter(PREFIX + "requests",
                                "Requests sent to a backend, by the HTTP status it answered; connect_error: no "
                                "answer (retried elsewhere), timeout: none in time.",
                                ["backend", "status"], registry=self.registry)
        self.retries = Counter(PREFIX + "retries", "Requests sent again to another backend because one could not "
                                                   "be reached.", registry=self.registry)
        self.resumed = Counter(PREFIX + "streams_resumed", "Streams that went on on another backend after theirs "
                                                           "broke off midway.", registry=self.registry)
        self.registry.register(_PoolCollector(pool))

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ----- forwarding ------------------------------------------------------------------------------------


class _NotStarted(Exception):
    """The backend sent nothing back: the request can go elsewhere."""


@dataclass(frozen=True)
class _Routed:
    """One request as the router forwards it: what it asks, where it came from, where it may go on."""

    method: str
    path: str
    query: str  # the URL's query string, "" for none
    headers: Mapping[str, str]  # the client's, names lower-case
    kind: str  # "completions", "chat", or "" for a request that is not generation
    parsed: Any  # the body as JSON
    body: bytes  # the body as it came


async def _wait_for_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _StreamRelay:
    """An upstream SSE stream relayed event by event, on plain ASGI; whatever ends it closes the upstream.

    The client leaving (seen by a watcher on ``receive``) closes the upstream connection, which the
    backend takes as its client gone (it aborts). When the upstream breaks off, the stream goes on on
    another backend (resume.py) or ends with an error event.
    """

    def __init__(self, forwarder: _Forwarder, routed: _Routed, upstream: aiohttp.ClientResponse,
                 backend: Backend) -> None:
        self._forwarder = forwarder
        self._routed = routed
        self._upstream = upstream
        self._backend = backend
        self._closed = False
        self._client_gone = False

    async def __call__(self, receive: Any, send: Any) -> None:
        watcher = asyncio.create_task(_wait_for_disconnect(receive))
        watcher.add_done_callback(self._on_disconnect)
        try:
            await send({"type": "http.response.start", "status": self._upstream.status,
                        "headers": _response_headers(self._upstream)})
            async for out in self._chunks():
                if self._client_gone:
                    break
                await send({"type": "http.response.body", "body": out, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.remove_done_callback(self._on_disconnect)
            watcher.cancel()
            self._release()

    def _on_disconnect(self, watcher: asyncio.Task) -> None:
        if not watcher.cancelled():
            self._client_gone = True
            self._release()  # the relay's wait on the upstream ends, and the backend sees its client gone

    async def _chunks(self) -> AsyncIterator[bytes]:
        log = StreamLog()
        tried = {self._backend.url: "broke off the stream"}
        while True:
            try:
                async for chunk in self._upstream.content.iter_any():
                    if out := log.feed(chunk):
                        yield out
                if out := log.flush():
                    yield out
                return
            except _BROKEN_OFF_ERRORS as error:  # the status line went out long ago: go on elsewhere, or say it
                if self._client_gone:
                    return
                log.drop_pending()
                logger.warning("backend %s broke off a stream: %r", self._backend.url, error)
                failure = f"the backend {self._backend.url} broke off the stream: {error!r}"
            try:
                resumed = await self._go_on_elsewhere(log, tried)
            except (NotResumable, OpenAIError) as why:
                message = why.message if isinstance(why, OpenAIError) else str(why)
                yield sse_error_event(f"{failure}; it cannot go on elsewhere: {message}")
                return
            if resumed is not None:  # it was over already, or its token budget ran out: it ends here
                if resumed:
                    yield resumed
                return

    async def _go_on_elsewhere(self, log: StreamLog, tried: dict[str, str]) -> Optional[bytes]:
        """Switches to a continuation on another backend (None), or gives the stream's last bytes when it is over."""
        kind = self._routed.kind
        progress = progress_of(kind, log.events())
        if progress.done:
            return b""
        if progress.finished:
            return b"data: [DONE]\n\n"
        body = continuation_body(kind, self._routed.parsed, progress)
        if body is None:
            return finish_events(kind, progress)
        routed = dataclasses.replace(self._routed, parsed=body, body=json.dumps(body).encode())
        self._release()
        backend, upstream = await self._forwarder.open_routed(routed, tried)
        if upstream.status >= 400 or not _is_event_stream(upstream):
            try:
                detail = (await upstream.read()).decode("utf-8", "replace")[:500]
            finally:
                backend.release()
                upstream.close()
            raise OpenAIError(f"{backend.url} answered the continuation with {upstream.status}: {detail}")
        if self._client_gone:  # it left while the continuation was opened
            backend.release()
            upstream.close()
            return b""
        logger.warning("the stream goes on on %s after %d tokens", backend.url, progress.num_tokens)
        self._forwarder.metrics.resumed.inc()
        tried[backend.url] = "broke off the stream"
        self._backend, self._upstream, self._closed = backend, upstream, False
        log.rewrite = continuation_rewriter(kind, progress)
        return None

    def _release(self) -> None:
        if not self._closed:
            self._closed = True
            self._backend.release()
            if self._upstream.content.at_eof():
                self._upstream.release()  # the connection goes back to the pool
            else:
                self._upstream.close()  # dropped midway: the backend aborts the request


def sse_error_event(message: str) -> bytes:
    return f"data: {json.dumps(error_body(message, 502, type='server_error', code='backend_error'))}\n\n".encode()


def _is_event_stream(upstream: aiohttp.ClientResponse) -> bool:
    return upstream.headers.get("content-type", "").startswith("text/event-stream")


def _response_headers(upstream: aiohttp.ClientResponse) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in upstream.headers.items()
            if name.lower() not in _DROP_RESPONSE_HEADERS]


async def read_whole(backend: Backend, upstream: aiohttp.ClientResponse) -> bytes:
    """An answer that is not a stream, read whole; the backend's count and the connection are released."""
    try:
        return await upstream.read()
    except _BROKEN_OFF_ERRORS as error:
        raise OpenAIError(f"the backend {backend.url} broke off its response: {error!r}", 502,
                          type="server_error", code="backend_error") from error
    finally:
        backend.release()
        upstream.release()


class _Forwarder:
    """Sends a request to a backend the policy picks, retries it while it is unstarted, relays the answer."""

    def __init__(self, pool: BackendPool, policy: RoutingPolicy, metrics: RouterMetrics) -> None:
        self.pool = pool
        self.policy = policy
        self.metrics = metrics

    async def open_routed(self, routed: _Routed, failures: dict[str, str]) -> tuple[Backend, aiohttp.ClientResponse]:
        """The answer's head from a backend the policy picks among those not in ``failures`` (which it extends)."""
        route = route_request_of(routed.kind, routed.parsed, routed.headers)
        for attempt in range(len(self.pool.backends)):
            loads = self.pool.loads(exclude=failures)
            if not any(load.healthy for load in loads):
                break
            decision = self.policy.choose(route, loads)
            self.metrics.decisions.labels(self.policy.name, decision.reason).inc()
            if attempt:
                self.metrics.retries.inc()
            backend = self.pool.get(decision.replica_id)
            try:
                upstream = await self._open(backend, routed)
            except _NotStarted as failure:
                failures[backend.url] = str(failure)
                continue
            if upstream.status < 400:
                self.policy.on_routed(route, backend.url)
            return backend, upstream
        raise self._no_backend(failures)

    async def first_routable(self, routed: _Routed) -> tuple[Backend, aiohttp.ClientResponse]:
        """A GET's answer's head from the first routable backend (in ``--backend`` order) that can be reached."""
        failures: dict[str, str] = {}
        for backend in self.pool.backends:
            if not backend.routable(self.pool.now_s()):
                continue
            try:
                return backend, await self._open(backend, routed)
            except _NotStarted as failure:
                failures[backend.url] = str(failure)
        raise self._no_backend(failures)

    async def _open(self, backend: Backend, routed: _Routed) -> aiohttp.ClientResponse:
        """The backend's response with its headers read and its body not yet; _NotStarted if none came."""
        headers = {k: v for k, v in routed.headers.items() if k not in _DROP_REQUEST_HEADERS} | _UPSTREAM_ENCODING
        url = backend.url + routed.path + (f"?{routed.query}" if routed.query else "")
        backend.acquire(self.pool.now_s())
        try:
            upstream = await self.pool.client.request(routed.method, url, headers=headers, data=routed.body or None)
        except aiohttp.ClientError as error:
            if isinstance(error, aiohttp.SocketTimeoutError):  # connected, then no answer in time
                backend.release()
                backend.abandon_trial()
                self.metrics.requests.labels(backend.url, "timeout").inc()
                raise OpenAIError(f"the backend {backend.url} did not answer in time ({error!r})", 504,
                                  type="server_error", code="backend_timeout") from error
            # refused, reset, closed or garbled before an answer's head: the backend never started it
            backend.release()
            backend.on_connect_failure(self.pool.now_s())
            self.metrics.requests.labels(backend.url, "connect_error").inc()
            logger.warning("backend %s could not be reached (%r); the request goes elsewhere", backend.url, error)
            raise _NotStarted(f"could not be reached ({type(error).__name__}: {error})") from error
        except BaseException:  # the client left, or a bug: the count must not leak either way
            backend.release()
            backend.abandon_trial()
            raise
        backend.on_answered()
        self.metrics.requests.labels(backend.url, str(upstream.status)).inc()
        return upstream

    async def relay(self, backend: Backend, upstream: aiohttp.ClientResponse, routed: _Routed, receive: Any,
                    send: Any) -> None:
        """The upstream's answer to the client: an SSE stream event by event, anything else whole."""
        if _is_event_stream(upstream):
            await _StreamRelay(self, routed, upstream, backend)(receive, send)
            return
        content = await read_whole(backend, upstream)
        headers = _response_headers(upstream) + [(b"content-length", str(len(content)).encode())]
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        await send({"type": "http.response.body", "body": content, "more_body": False})

    def _no_backend(self, failures: Mapping[str, str]) -> OpenAIError:
        now_s = self.pool.now_s()
        reasons = []
        for backend in self.pool.backends:
            if backend.url in failures:
                reasons.append(f"{backend.url} {failures[backend.url]}")
            elif not backend.up:
                reasons.append(f"{backend.url} is down (fails its health checks)")
            elif not backend.routable(now_s):
                reasons.append(f"{backend.url} has its circuit breaker {backend.breaker_state(now_s)} "
                               "after failed connections")
        return OpenAIError("no healthy backend to route to: " + "; ".join(reasons), 503,
                           code="no_healthy_backend")


# ----- the app ---------------------------------------------------------------------------------------


def health_report(pool: BackendPool) -> tuple[dict[str, Any], int]:
    """``/health``'s body and status: 200 while any backend is up, else 503."""
    now_s = pool.now_s()
    backends = [backend.status(now_s) for backend in pool.backends]
    any_up = any(backend.up for backend in pool.backends)
    return {"status": "ok" if any_up else "unavailable", "backends": backends}, 200 if any_up else 503


async def _read_body(receive: Any) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_BODY_BYTES:
            raise OpenAIError(f"the request body is larger than {MAX_BODY_BYTES} bytes", 413,
                              code="request_too_large")
        if not message.get("more_body", False):
            return b"".join(chunks)


class _ClientGone(Exception):
    """The client left before its request was read."""


def _routed_of(scope: dict, kind: str) -> _Routed:
    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
    return _Routed(scope["method"], scope["path"], scope.get("query_string", b"").decode("latin-1"), headers,
                   kind, None, b"")


class RouterApp:
    """The router's ASGI app: generation requests are handled on plain ASGI (the hot path: no framework
    layers between the client's socket and the backend's); the rest (models, health, metrics, and the
    lifespan that starts the pool) by a FastAPI app."""

    def __init__(self, pool: BackendPool, policy: RoutingPolicy) -> None:
        self.pool = pool
        self.policy = policy
        self.metrics = RouterMetrics(pool)
        self.forwarder = _Forwarder(pool, policy, self.metrics)
        self.app = self._other_routes()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        kind = _GENERATION_PATHS.get(scope["path"]) if scope["type"] == "http" else None
        if kind is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        routed = _routed_of(scope, kind)
        try:
            body = await _read_body(receive)
            routed = dataclasses.replace(routed, parsed=parse_json_body(body), body=body)  # 400 if not JSON
            backend, upstream = await self.forwarder.open_routed(routed, {})
            await self.forwarder.relay(backend, upstream, routed, receive, send)
        except OpenAIError as error:
            await json_error(error)(scope, receive, send)
        except _ClientGone:
            pass

    def _other_routes(self) -> FastAPI:
        pool, policy, metrics, forwarder = self.pool, self.policy, self.metrics, self.forwarder

        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            await pool.start(on_down=policy.forget_replica)
            try:
                yield
            finally:
                await pool.aclose()

        app = FastAPI(title="splitfuse router", lifespan=lifespan)
        install_error_handlers(app)

        @app.get("/v1/models")
        async def models(raw: Request) -> Response:
            backend, upstream = await forwarder.first_routable(_routed_of(raw.scope, ""))
            content = await read_whole(backend, upstream)
            return Response(content, status_code=upstream.status,
                            headers={k.decode(): v.decode("latin-1") for k, v in _response_headers(upstream)})

        @app.get("/health")
        async def health() -> Response:
            body, status = health_report(pool)
            return JSONResponse(body, status_code=status)

        @app.get("/metrics")
        async def prometheus_metrics() -> Response:
            return Response(metrics.render(), media_type=CONTENT_TYPE)

        return app


def build_router_app(pool: BackendPool, policy: RoutingPolicy) -> RouterApp:
    """The router app; its lifespan starts the pool (first health round, then the loop) and closes it."""
    return RouterApp(pool, policy)
