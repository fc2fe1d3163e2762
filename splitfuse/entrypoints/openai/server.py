"""The OpenAI-compatible HTTP app (FastAPI) around an AsyncLLMEngine, and how to run it under uvicorn."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import FrameType
from typing import Any, Optional

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from splitfuse.engine.async_engine import AsyncLLMEngine
from splitfuse.entrypoints.openai.errors import OpenAIError, install_error_handlers, json_error
from splitfuse.entrypoints.openai.json_body import JSONBodyRoute
from splitfuse.entrypoints.openai.middleware import APIKeyMiddleware, BodySizeLimitMiddleware
from splitfuse.entrypoints.openai.prompt_workers import PromptWorkers
from splitfuse.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from splitfuse.entrypoints.openai.server_config import ServerConfig
from splitfuse.entrypoints.openai.serving_chat import OpenAIServingChat
from splitfuse.entrypoints.openai.serving_completion import OpenAIServingCompletion
from splitfuse.metrics.prometheus import CONTENT_TYPE, ServerMetrics

logger = logging.getLogger(__name__)

# After uvicorn has drained (or cancelled) the connections, the engine needs only to stop.
_ENGINE_STOP_TIMEOUT_S = 2.0
# uvicorn cancels handlers this long after the engine's drain deadline, should one still hang.
_BACKSTOP_S = 5.0


def splitfuse_version() -> str:
    import splitfuse

    version = getattr(splitfuse, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import version as dist_version

        return dist_version("splitfuse")
    except Exception:  # running from a source tree that is not installed
        return "0.1.0+source"


def build_app(engine: AsyncLLMEngine, served_model_names: list[str], config: Optional[ServerConfig] = None, *,
              api_key: Optional[str] = None, max_request_body_bytes: Optional[int] = None) -> FastAPI:
    """The app; its lifespan starts the engine thread and stops it (and the prompt workers) at shutdown.

    ``api_key`` and ``max_request_body_bytes``, when given, replace those fields of ``config``.
    """
    config = config or ServerConfig()
    overrides = {"api_key": api_key, "max_request_body_bytes": max_request_body_bytes}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    metrics = ServerMetrics(lambda: engine.stats, model_name=served_model_names[0],
                            get_loop_totals=lambda: (engine.num_steps, engine.busy_time_s))
    engine.observer = metrics
    workers = PromptWorkers(engine.tokenizer, engine.max_model_len, num_workers=config.prompt_workers,
                            template_timeout_s=config.chat_template_timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            workers.close()
            await engine.shutdown(_ENGINE_STOP_TIMEOUT_S)

    app = FastAPI(title="splitfuse", version=splitfuse_version(), lifespan=lifespan)
    app.router.route_class = JSONBodyRoute  # bodies parsed by jiter: lone surrogates, deep nesting -> 400
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.prompt_workers = workers
    install_error_handlers(app)
    completions = OpenAIServingCompletion(engine, served_model_names, metrics, config=config, workers=workers)
    chat = OpenAIServingChat(engine, served_model_names, metrics, config=config, workers=workers)

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        return await completions.create_completion(request, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await chat.create_chat_completion(request, raw_request)

    # One list for the server's life: a model's `created` is when this server began serving it.
    model_list = ModelList(data=[ModelCard(id=name, root=served_model_names[0], max_model_len=engine.max_model_len)
                                 for name in served_model_names])

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return model_list

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_alive:
            return json_error(OpenAIError("the engine is not running", 503, code="engine_unavailable"))
        replicas_up = getattr(engine.stats, "replicas_up", None)
        if replicas_up is None:
            return JSONResponse({"status": "ok"})
        replicas = {replica: "up" if up else "down" for replica, up in replicas_up.items()}
        if not any(replicas_up.values()):
            return json_error(OpenAIError(f"no engine replica is running: {replicas}", 503, code="engine_unavailable"))
        return JSONResponse({"status": "ok" if all(replicas_up.values()) else "degraded", "replicas": replicas})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": splitfuse_version()}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # add_middleware wraps: the last one added runs first, so the key is checked before the body is read.
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=config.max_request_body_bytes)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    return app


class GracefulServer(uvicorn.Server):
    """uvicorn's server, except that SIGINT/SIGTERM end in a clean exit (status 0).

    On the first signal uvicorn stops accepting and waits for open connections, and
    ``on_signal`` starts the engine's shutdown: in-flight requests get ``drain_s`` to
    finish, then end with an error event (streams) or a 503. uvicorn's own timeout,
    a few seconds later, is only a backstop. uvicorn would re-raise the signal after
    its shutdown (death by SIGTERM, exit code -15); this server does not.
    """

    def __init__(self, config: uvicorn.Config, on_signal: Optional[Callable[[], None]] = None) -> None:
        super().__init__(config)
        self._on_signal = on_signal

    def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:
        if not self.should_exit and self._on_signal is not None:
            self._on_signal()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_server(engine: AsyncLLMEngine, served_model_names: list[str], server_config: ServerConfig) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code."""
    app = build_app(engine, served_model_names, server_config)
    drain_s = server_config.shutdown_timeout_s
    config = uvicorn.Config(app, host=server_config.host, port=server_config.port,
                            log_level=server_config.log_level, lifespan="on",
                            timeout_graceful_shutdown=drain_s + _BACKSTOP_S)  # type: ignore[arg-type]
    server = GracefulServer(config, on_signal=lambda: engine.begin_shutdown(drain_s))
    server.run()
    return 0 if server.started else 1


class ServerThread:
    """Runs an app on 127.0.0.1 and a free port in a background thread; for tests and benchmarks.

    with ServerThread(build_app(engine, ["demo"])) as server:
        httpx.get(server.url + "/health")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", start_timeout_s: float = 60.0) -> None:
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and without
        # it a keep-alive response (headers, then body) waits ~40 ms for the client's delayed ACK.
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, 0))  # bound now, so no other process can take the port before uvicorn
        self.host, self.port = self._socket.getsockname()[:2]
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="splitfuse-test-server", daemon=True)
        self._start_timeout_s = start_timeout_s

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._socket.close()
