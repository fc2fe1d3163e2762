"""EngineCoreClient: how a frontend drives an EngineCore — in this thread, or in another process.

One typed protocol for every way to run the core, so ``LLMEngine`` (and the server above it)
does not know which one it has:

- ``InProcClient``: the core lives in the calling thread; ``get_output`` runs one step.
- ``MPClient`` (``engine/core_process.py``): the core steps in its own process, fed over
  ZeroMQ with msgpack; ``get_output`` returns its next step's results.

Only one thread may call a client (the AsyncLLMEngine's engine thread, or the offline LLM).
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import tempfile
import weakref
from collections import deque
from typing import Iterable, Optional, Protocol, Union

import msgspec
import zmq

from splitfuse.config import EngineConfig
from splitfuse.engine.core import EngineCore, QueueFullError
from splitfuse.engine.core_process import (AbortRequests, AddAck, AddRequests, OutputMessage, Ready, StartupError,
                                           StepOutputs, Shutdown, run_engine_core, startup_exception)
from splitfuse.engine.protocol import EngineCoreError, EngineCoreOutputs, EngineCoreRequest, SchedulerStats

logger = logging.getLogger(__name__)


class EngineCoreClient(Protocol):
    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        """Queues one request's sequences, or raises ValueError / QueueFullError with nothing queued."""
        ...

    def add_request_groups(self, groups: list[list[EngineCoreRequest]]) -> list[Optional[Exception]]:
        """``add_requests`` for several requests at once: per group, None (queued) or why it was refused."""
        ...

    def abort_requests(self, request_ids: Iterable[str]) -> None: ...

    def get_output(self) -> EngineCoreOutputs:
        """The next step's results (an in-process client runs the step now)."""
        ...

    def stats(self) -> Optional[SchedulerStats]: ...

    def shutdown(self) -> None: ...


class InProcClient:
    def __init__(self, engine_core: EngineCore) -> None:
        self.engine_core = engine_core

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        self.engine_core.add_requests(requests)

    def add_request_groups(self, groups: list[list[EngineCoreRequest]]) -> list[Optional[Exception]]:
        results: list[Optional[Exception]] = []
        for group in groups:
            try:
                self.engine_core.add_requests(group)
                results.append(None)
            except ValueError as error:  # QueueFullError too
                results.append(error)
        return results

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.engine_core.abort_requests(request_ids)

    def get_output(self) -> EngineCoreOutputs:
        return self.engine_core.step()

    def stats(self) -> SchedulerStats:
        return self.engine_core.stats()

    def shutdown(self) -> None:
        self.engine_core.shutdown()


class EngineCoreStepError(RuntimeError):
    """A step failed in the core process; ``request_ids`` (every unfinished sequence) were aborted there."""

    def __init__(self, message: str, request_ids: list[str]) -> None:
        super().__init__(message)
        self.request_ids = request_ids


class EngineCoreDeadError(RuntimeError):
    """The core process exited without being asked to; nothing it held can be recovered."""


class MPClient:
    """The core in a child process (``engine/core_process.py``), fed over ZeroMQ.

    ``add_requests`` / ``add_request_groups`` is one round trip: it waits for the child's answers,
    which come after the step under way, and keeps any step outputs that arrive meanwhile for
    ``get_output``, in order.
    ``get_output`` blocks until the next step's outputs. The child steps only while it has
    unfinished requests, so call it only while some request is unfinished: with none it may
    wait forever. A failed step raises ``EngineCoreStepError`` from ``get_output`` (its requests
    are aborted in the child already); a child that died raises ``EngineCoreDeadError``.

    The child is stopped by ``shutdown``, or when this client is garbage-collected, or at
    interpreter exit, whichever comes first; and it exits by itself if this process dies.
    The ``spawn`` start method re-imports the caller's main module in the child: a script that
    builds an MPClient needs the usual ``if __name__ == "__main__":`` guard.
    """

    SHUTDOWN_TIMEOUT_S = 10.0

    def __init__(self, config: EngineConfig, startup_timeout_s: float = 600.0,
                 cpu_ids: Optional[list[int]] = None) -> None:
        """``cpu_ids``: the cores the child is pinned to, one torch thread each (None: as this process)."""
        socket_dir = tempfile.mkdtemp(prefix="splitfuse-core-")  # 0700: only this user can connect
        input_address, output_address = f"ipc://{socket_dir}/input", f"ipc://{socket_dir}/output"
        context = zmq.Context()
        self._input = context.socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)  # sends never block while the child is alive
        self._input.bind(input_address)
        self._output = context.socket(zmq.PULL)
        self._output.setsockopt(zmq.RCVHWM, 0)
        self._output.bind(output_address)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(OutputMessage)
        self._buffer: deque[Union[EngineCoreOutputs, EngineCoreError]] = deque()
        self._process = multiprocessing.get_context("spawn").Process(
            target=run_engine_core, name="splitfuse-engine-core", daemon=True,
            args=(config, input_address, output_address, logging.getLogger("splitfuse").getEffectiveLevel(), cpu_ids))
        # Runs once: at shutdown(), when this client is collected, or at interpreter exit.
        self._finalizer = weakref.finalize(self, _stop_core_process, self._process, context, self._input,
                                           self._encoder.encode(Shutdown()), socket_dir, self.SHUTDOWN_TIMEOUT_S)
        self._process.start()
        self._poller = zmq.Poller()
        self._poller.register(self._output, zmq.POLLIN)
        self._poller.register(self._process.sentinel, zmq.POLLIN)  # readable once the child has exited
        try:
            self._stats = self._wait_until_ready(startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        (error,) = self.add_request_groups([requests])
        if error is not None:
            raise error

    def add_request_groups(self, groups: list[list[EngineCoreRequest]]) -> list[Optional[Exception]]:
        """All the adds go out at once and are answered together, after the step under way: one wait, not one each."""
        for group in groups:
            self._send(AddRequests(group))
        results: list[Optional[Exception]] = []
        while len(results) < len(groups):
            message = self._receive(timeout_ms=None)
            if isinstance(message, AddAck):
                results.append(None)
            elif isinstance(message, EngineCoreError) and message.kind != "StepError":
                results.append(refusal_error(message))
            else:
                self._keep(message)
        return results

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        request_ids = list(request_ids)
        if request_ids:
            self._send(AbortRequests(request_ids))

    def wait_handles(self) -> list:
        """What a poller over several clients waits on: the output socket and the child's exit."""
        return [self._output, self._process.sentinel]

    def take_output(self) -> Optional[EngineCoreOutputs]:
        """The next step's outputs if they have arrived (kept ones first), else None; never waits."""
        while not self._buffer:
            message = self._receive(timeout_ms=0)
            if message is None:
                return None
            self._keep(message)
        item = self._buffer.popleft()
        if isinstance(item, EngineCoreError):
            raise EngineCoreStepError(item.message, item.request_ids)
        return item

    def get_output(self) -> EngineCoreOutputs:
        """The next step's outputs, kept ones first; blocks (forever, if the core has nothing unfinished)."""
        while not self._buffer:
            self._keep(self._receive(timeout_ms=None))
        item = self._buffer.popleft()
        if isinstance(item, EngineCoreError):
            raise EngineCoreStepError(item.message, item.request_ids)
        return item

    def stats(self) -> SchedulerStats:
        """The numbers of the latest step received (outputs already here are read first, and kept)."""
        if not (self._finalizer.alive and self._process.is_alive()):
            return self._stats
        message = self._receive(timeout_ms=0)
        while message is not None:
            self._keep(message)
            message = self._receive(timeout_ms=0)
        return self._stats

    def shutdown(self) -> None:
        """Stops the child (it finishes its step, then exits; killed after SHUTDOWN_TIMEOUT_S); idempotent."""
        self._finalizer()

    # -- the sockets ----------------------------------------------------------------------

    def _wait_until_ready(self, timeout_s: float) -> SchedulerStats:
        message = self._receive(timeout_ms=int(timeout_s * 1000))
        if isinstance(message, Ready):
            return message.stats
        if isinstance(message, StartupError):
            raise startup_exception(message)
        if message is None:
            raise TimeoutError(f"the engine core process did not load the model within {timeout_s:.0f} s")
        raise RuntimeError(f"the engine core process sent {message!r} before it was ready")

    def _send(self, message: Union[AddRequests, AbortRequests]) -> None:
        if not self._finalizer.alive:
            raise RuntimeError("this engine core client is shut down")
        data = self._encoder.encode(message)
        while True:
            try:
                self._input.send(data, zmq.NOBLOCK)
                return
            except zmq.Again:  # no peer: not connected yet, or gone because the child died
                if not self._process.is_alive():
                    raise self._dead_error() from None
                self._input.poll(100, zmq.POLLOUT)

    def _receive(self, timeout_ms: Optional[int]) -> Optional[OutputMessage]:
        """The child's next message, or None if none came within ``timeout_ms`` (None: wait for ever)."""
        if not self._finalizer.alive:
            raise RuntimeError("this engine core client is shut down")
        events = dict(self._poller.poll(timeout_ms))
        # The socket first: a child's last messages may arrive together with its exit.
        if self._output in events or (self._process.sentinel in events and self._output.poll(500)):
            return self._decoder.decode(self._output.recv(copy=False).buffer)
        if self._process.sentinel in events:
            raise self._dead_error()
        return None

    def _keep(self, message: Optional[OutputMessage]) -> None:
        """Buffers a step's outputs (or its failure) for get_output."""
        if isinstance(message, StepOutputs):
            if message.outputs.scheduler_stats is not None:
                self._stats = message.outputs.scheduler_stats
            self._buffer.append(message.outputs)
        elif isinstance(message, EngineCoreError) and message.kind == "StepError":
            self._buffer.append(message)
        else:
            raise RuntimeError(f"unexpected message from the engine core process: {message!r}")

    def _dead_error(self) -> EngineCoreDeadError:
        self._process.join(1.0)
        return EngineCoreDeadError(f"the engine core process (pid {self._process.pid}) exited with code "
                                   f"{self._process.exitcode}; its log above says why")


def refusal_error(error: EngineCoreError) -> Exception:
    """A core's refused add (``EngineCore.add_or_refuse``), as the exception the core raised there."""
    if error.kind == "QueueFullError":
        return QueueFullError(error.message)
    if error.kind == "ValueError":
        return ValueError(error.message)
    return RuntimeError(f"the engine core failed to add {error.request_ids}: {error.kind}: {error.message}")


def _stop_core_process(process: multiprocessing.process.BaseProcess, context: zmq.Context,
                       input_socket: zmq.Socket, shutdown_message: bytes, socket_dir: str,
                       timeout_s: float) -> None:
    """Asks the child to exit, kills it after ``timeout_s``, and frees the sockets; never blocks longer."""
    try:
        if process.pid is not None and process.is_alive():
            try:
                input_socket.send(shutdown_message, zmq.NOBLOCK)
            except zmq.ZMQError:  # not connected: it is dying anyway
                pass
            process.join(timeout_s)
            if process.is_alive():
                logger.warning("the engine core process did not exit within %.0f s; killing it", timeout_s)
                process.kill()
                process.join(5.0)
    finally:
        context.destroy(linger=0)
        shutil.rmtree(socket_dir, ignore_errors=True)
