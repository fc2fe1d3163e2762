"""AsyncLLMEngine: one engine thread steps the LLMEngine; many asyncio callers each get a stream of outputs.

Why a thread and not a process: the engine's time goes to torch kernels, which release
the GIL, so HTTP work on the event loop and the engine loop overlap without pickling
outputs across a process boundary (see benchmarks/serve_load.py for the measurement).
One condition: the event-loop thread must never start OpenMP work, or the engine thread's
parallel ops slow down 2-4x (``from_config`` explains; benchmarks/omp_teams.py measures it).

Threading contract (the LLMEngine itself is not thread-safe):
- only the engine thread calls into the LLMEngine (add, abort, step, stats);
- the event-loop thread talks to it through a FIFO of commands (add / abort / stop);
- the engine thread hands results back with ``loop.call_soon_threadsafe``, once per step;
- when idle the engine thread blocks on the command queue, so it never spins.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any, Optional, Protocol

from splitfuse.engine.llm_engine import NewRequest
from splitfuse.engine.llm_engine import QueueFullError  # re-exported: the engine refuses, the server says 429
from splitfuse.engine.request_stream import RequestStream
from splitfuse.outputs import RequestOutput, RequestOutputKind
from splitfuse.sampling_params import SamplingParams

__all__ = ["AsyncLLMEngine", "EngineDeadError", "EngineStepError", "EngineStoppedError", "QueueFullError",
           "RequestObserver", "RequestStream"]

logger = logging.getLogger(__name__)


class EngineStoppedError(RuntimeError):
    """The engine is shutting down (or has stopped) and accepts no new requests."""


class EngineDeadError(RuntimeError):
    """The engine thread failed and cannot serve; the process should be restarted."""


class EngineStepError(RuntimeError):
    """One engine step raised; the requests in flight at that moment were aborted."""


class RequestObserver(Protocol):
    """Receives per-request latencies as outputs reach the event loop (e.g. Prometheus histograms)."""

    def on_first_token(self, ttft_s: float) -> None: ...

    def on_inter_token(self, itl_s: float) -> None: ...

    def on_finished(self, finish_reason: str, e2e_s: float) -> None: ...


@dataclasses.dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float
    priority: int
    stream: "RequestStream"
    tenant: Optional[str] = None


@dataclasses.dataclass
class _Abort:
    request_ids: list[str]


_STOP = object()


def run_in_thread(function: Any, *args: Any) -> Any:
    """``function(*args)`` on a new thread that ends right after; its result or exception comes back here."""
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(function(*args))
        except BaseException as raised:  # re-raised on the calling thread
            error.append(raised)

    thread = threading.Thread(target=target, name="splitfuse-engine-init")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


class AsyncLLMEngine:
    """Serves many concurrent asyncio callers from one engine thread.

    Usage (inside a running event loop)::

        engine = AsyncLLMEngine(LLMEngine.from_config(config))
        engine.start()
        async for output in engine.generate("req-1", "Hello", SamplingParams(max_tokens=8)):
            print(output.outputs[0].text)   # cumulative text
        await engine.shutdown()

    ``add_request`` raises ``ValueError`` (bad request, message from the engine),
    ``QueueFullError`` (a ValueError: the waiting queue is at max_waiting_requests),
    ``EngineStoppedError`` or ``EngineDeadError`` before any output arrives, so an HTTP
    layer can answer with a status code before it starts a stream.
    """

    def __init__(self, engine: Any, *, observer: Optional[RequestObserver] = None) -> None:
        self.engine = engine
        self.observer = observer
        # HF fast tokenizers raise "Already borrowed" when two threads use one instance,
        # and the engine thread detokenizes all the time: the event loop gets its own copy.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = engine.vocab_size
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # event-loop thread only
        self._live_ids: set[str] = set()  # engine thread only: ids added and not yet finished/aborted
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._accepting = False
        self._shutdown_task: Optional[asyncio.Future[None]] = None
        self._dead_error: Optional[BaseException] = None
        self._stats: Any = None
        self.num_steps = 0
        self.busy_time_s = 0.0  # wall time spent inside engine.step(); steps/busy = step rate

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> "AsyncLLMEngine":
        """Builds the LLMEngine on a short-lived thread, so this (event-loop) thread runs no torch work.

        OpenMP, torch's CPU thread pool, keeps one worker team per thread that starts parallel work.
        Loading a model starts it; had that been this thread, its team would outlive the load, and
        with two teams libgomp has more threads than cores and stops spinning between parallel ops:
        each op then waits for a sleeping worker to wake, and a decode step took 2.3x longer on the
        engine thread (benchmarks/omp_teams.py). A finished thread's team ends with it.
        """
        from splitfuse.engine.llm_engine import LLMEngine

        return cls(run_in_thread(LLMEngine.from_config, config), **kwargs)

    # ----- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume the outputs."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stats = self.engine.get_stats()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="splitfuse-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Refuse new requests, let in-flight ones finish for up to ``timeout_s``, abort the rest, stop.

        Idempotent: a second call waits for the shutdown already under way.
        """
        self._begin_shutdown(timeout_s)
        assert self._shutdown_task is not None
        await asyncio.shield(self._shutdown_task)

    def begin_shutdown(self, timeout_s: float) -> None:
        """Start ``shutdown`` without waiting; safe from any thread and from a signal handler."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._begin_shutdown, timeout_s)

    def _begin_shutdown(self, timeout_s: float) -> None:
        if self._shutdown_task is None:
            self._accepting = False
            self._shutdown_task = asyncio.ensure_future(self._shutdown(timeout_s))

    async def _shutdown(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._streams and time.monotonic() < deadline and self.is_alive:
            await asyncio.sleep(0.02)
        # Failing the streams (rather than cancelling their handlers) lets each response end
        # properly: an error event and [DONE] for a stream, a 503 for a plain request.
        for request_id, stream in list(self._streams.items()):
            self.abort(request_id)
            stream._fail(EngineStoppedError("the server is shutting down; request aborted"))
        if self._thread is not None:
            self._commands.put(_STOP)
            await asyncio.to_thread(self._thread.join, max(1.0, deadline - time.monotonic()))
            self._thread = None

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead_error is None

    @property
    def stats(self) -> Any:
        """The engine's ``EngineStats`` after the latest step (a snapshot; safe to read from any thread)."""
        return self._stats

    @property
    def num_unfinished(self) -> int:
        """Requests whose streams are still open (accepted or about to be)."""
        return len(self._streams)

    # ----- requests (event-loop thread) ---------------------------------------------------

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                          priority: int = 0, arrival_time: Optional[float] = None,
                          tenant: Optional[str] = None) -> RequestStream:
        """Queue a request; returns its stream once the engine accepted it, or raises why not.

        ``tenant``: who sent it (the OpenAI ``user`` field); replicas with session routing keep a tenant on one.
        """
        if self._dead_error is not None:
            raise EngineDeadError(f"the engine has stopped after an error: {self._dead_error!r}")
        if not self._accepting:
            raise EngineStoppedError("the server is shutting down and accepts no new requests")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        arrival_time = time.time() if arrival_time is None else arrival_time
        stream = RequestStream(request_id, self, arrival_time)
        self._streams[request_id] = stream
        self._commands.put(_Add(request_id, prompt, params, arrival_time, priority, stream, tenant))
        try:
            # shield: a cancelled caller must not cancel the shared future; we abort instead.
            await asyncio.shield(stream._accepted)
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                       priority: int = 0, arrival_time: Optional[float] = None) -> AsyncIterator[RequestOutput]:
        """``add_request`` + iterate; leaving the loop early (break, cancel, error) aborts the request.

        Wrap in ``contextlib.aclosing`` so that an early exit aborts at once, not at garbage collection.
        """
        stream = await self.add_request(request_id, prompt, params, priority=priority, arrival_time=arrival_time)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        """Abort one request (unknown or finished ids are ignored). Call on the event loop."""
        stream = self._streams.pop(request_id, None)
        if stream is None or stream.finished:
            return
        stream.finished = True
        # Nobody awaits the acceptance any more; read its outcome so asyncio does not warn.
        stream._accepted.add_done_callback(lambda future: future.cancelled() or future.exception())
        self._commands.put(_Abort([request_id]))
        if self.observer is not None:
            self.observer.on_finished("abort", time.time() - stream.arrival_time)

    # ----- engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                if not self._handle_commands(block=idle):
                    self.engine.shutdown()  # on this thread, like every call into the engine: stops a core process
                    return
                if self.engine.has_unfinished_requests():
                    self._step()
        except BaseException as error:  # a bug in the engine itself: fail every caller, stay down
            logger.exception("engine thread died")
            self._dead_error = error
            self._post(self._fail_all, EngineDeadError(f"the engine thread died: {error!r}"))

    def _handle_commands(self, block: bool) -> bool:
        """Apply every queued command (waiting for the first one when ``block``); False on stop."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        adds: list[_Add] = []  # consecutive adds go to the engine together: one exchange with its core
        while True:
            if isinstance(command, _Add):
                adds.append(command)
            else:
                self._add(adds)
                adds = []
                if command is _STOP:
                    return False
                live = [rid for rid in command.request_ids if rid in self._live_ids]
                if live:
                    self.engine.abort_request(live)
                    self._live_ids.difference_update(live)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                self._add(adds)
                # Aborts free blocks without a step: refresh the snapshot so /metrics sees it.
                self._stats = self.engine.get_stats()
                return True

    def _add(self, commands: list[_Add]) -> None:
        if not commands:
            return
        try:
            errors = self.engine.add_requests([
                NewRequest(c.request_id, c.prompt, c.params, c.arrival_time, c.priority, RequestOutputKind.DELTA,
                           c.tenant)
                for c in commands])
        except Exception as error:  # not a refusal: the engine failed to take them at all
            errors = [error] * len(commands)
        for command, error in zip(commands, errors):
            if error is not None:  # ValueError (QueueFullError too) for a refused request
                self._post(command.stream._fail, error)
                continue
            self._live_ids.add(command.request_id)
            self._post(_accept, command.stream)

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as error:
            self._recover_from_step_error(error)
            return
        self.busy_time_s += time.perf_counter() - started
        self.num_steps += 1
        for output in outputs:
            if output.finished:
                self._live_ids.discard(output.request_id)
        self._stats = self.engine.get_stats()
        if outputs:
            # DELTA outputs hold fresh lists (the new tokens only), so they can cross threads as they are.
            self._post(self._dispatch, outputs)

    def _recover_from_step_error(self, error: Exception) -> None:
        # The step may have left any request half-updated: abort all of them so the
        # engine's state is clean again, tell their callers, and keep serving.
        logger.exception("engine step failed; aborting %d request(s)", len(self._live_ids))
        failed = list(self._live_ids)
        self.engine.abort_request(failed)  # if this raises too, _run marks the engine dead
        self._live_ids.clear()
        self._stats = self.engine.get_stats()
        self._post(self._fail_ids, failed, EngineStepError(f"the engine failed while running this request: {error!r}"))

    def _post(self, callback: Any, *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed between the check and the call
            pass

    # ----- event-loop side of the hand-off ----------------------------------------------------------

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.time()
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:  # aborted by its caller after this step started
                continue
            stream._put(output)
            self._observe(stream, output, now)
            if output.finished:
                del self._streams[output.request_id]

    def _observe(self, stream: RequestStream, output: RequestOutput, now: float) -> None:
        observer = self.observer
        if observer is None:
            return
        positions = stream.num_output_positions
        new_positions = positions - stream._num_positions
        if new_positions > 0:
            if stream._first_token_time is None:
                stream._first_token_time = now
                observer.on_first_token(now - stream.arrival_time)
                new_positions -= 1
            if new_positions > 0 and stream._last_token_time is not None:
                # Several tokens in one step (e.g. a resumed request): spread the gap over them.
                gap_s = (now - stream._last_token_time) / new_positions
                for _ in range(new_positions):
                    observer.on_inter_token(gap_s)
            stream._last_token_time = now
            stream._num_positions = positions
        if output.finished:
            reason = output.outputs[0].finish_reason if output.outputs else None
            observer.on_finished(reason or "stop", now - stream.arrival_time)

    def _fail_ids(self, request_ids: Iterable[str], error: BaseException) -> None:
        for request_id in request_ids:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream._fail(error)

    def _fail_all(self, error: BaseException) -> None:
        self._fail_ids(list(self._streams), error)


def _accept(stream: RequestStream) -> None:
    if not stream._accepted.done():
        stream._accepted.set_result(None)

