"""The EngineCore in its own process: the main loop that feeds it from ZeroMQ and sends each step's outputs back.

The frontend (``MPClient`` in ``engine/core_client.py``) starts ``run_engine_core`` with the
``spawn`` start method (torch and fork do not mix) and binds two ZeroMQ sockets in a private
temp dir; the child connects to both:

- input, ``ipc://<dir>/input``: frontend PUSH -> core PULL: ``AddRequests``, ``AbortRequests``, ``Shutdown``;
- output, ``ipc://<dir>/output``: core PUSH -> frontend PULL: ``Ready`` or ``StartupError`` once,
  then ``AddAck`` or ``EngineCoreError`` for each add (in order), ``StepOutputs`` for each step, and
  ``EngineCoreError(kind="StepError")`` for a step that raised.

Why ipc and not tcp: both ends are on one host, a path in a 0700 temp dir needs no free port
(no race with other servers for one) and no other user can connect to it. Why the frontend
binds: it owns the temp dir and removes it, and a child that connects may start at any time.

Every message is one msgpack frame: a tagged msgspec struct (``[tag, field, ...]``), decoded
by a typed decoder on each side, so a malformed message fails loudly at the boundary.

The loop: block on the input socket while the core has nothing to do (no spinning); otherwise
apply every message already queued, then run one step and send its outputs. A step that
raises aborts every unfinished request and reports their ids, and the loop serves on (as the
in-thread AsyncLLMEngine does). A thread watches the parent: if it dies, the child exits
at once, so no orphan holds the model's memory. The child ignores SIGINT: Ctrl-C reaches the
whole process group, and the parent decides how to shut down (it drains requests first).
"""

from __future__ import annotations

import builtins
import logging
import multiprocessing
import os
import shutil
import signal
import threading
import traceback
from multiprocessing.connection import wait
from typing import Optional, Union

import msgspec
import torch
import zmq

from splitfuse.config import EngineConfig
from splitfuse.engine.core import EngineCore
from splitfuse.engine.protocol import EngineCoreError, EngineCoreOutputs, EngineCoreRequest, SchedulerStats

logger = logging.getLogger(__name__)

# Messages the child's output socket may hold when the child exits: how long close() waits to deliver them.
_OUTPUT_LINGER_MS = 5000


# -- frontend -> core ---------------------------------------------------------------------------------

class AddRequests(msgspec.Struct, array_like=True, tag=True):
    """Queue one request's sequences whole (``EngineCore.add_requests``); answered by ``AddAck`` or an error."""

    requests: list[EngineCoreRequest]


class AbortRequests(msgspec.Struct, array_like=True, tag=True):
    """Stop these sequences and free their blocks; no answer (their outputs simply stop)."""

    request_ids: list[str]


class Shutdown(msgspec.Struct, array_like=True, tag=True):
    """Stop the loop, shut the executor down and exit."""


InputMessage = Union[AddRequests, AbortRequests, Shutdown]


# -- core -> frontend ---------------------------------------------------------------------------------

class Ready(msgspec.Struct, array_like=True, tag=True):
    """The model is loaded; ``stats`` are the core's numbers before any request (the KV pool's size)."""

    stats: SchedulerStats


class StartupError(msgspec.Struct, array_like=True, tag=True):
    """Building the core failed; ``kind`` is the exception's class name (ValueError, FileNotFoundError, ...)."""

    kind: str
    message: str
    traceback: str = ""


class AddAck(msgspec.Struct, array_like=True, tag=True):
    """The oldest unanswered ``AddRequests`` was queued whole."""


class StepOutputs(msgspec.Struct, array_like=True, tag=True):
    """One step's results (``EngineCoreOutputs`` is untagged, so it travels inside this)."""

    outputs: EngineCoreOutputs


OutputMessage = Union[Ready, StartupError, AddAck, EngineCoreError, StepOutputs]


# -- the child process --------------------------------------------------------------------------------

def run_engine_core(config: EngineConfig, input_address: str, output_address: str,
                    log_level: int = logging.INFO, cpu_ids: Optional[list[int]] = None) -> None:
    """The child's entry point (a ``multiprocessing`` target): build the core, report, serve until Shutdown.

    ``cpu_ids``: pin this process to these cores and run one torch thread on each (a replica's share).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cpu_ids:
        os.sched_setaffinity(0, cpu_ids)
        torch.set_num_threads(len(cpu_ids))
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [engine core] %(name)s: %(message)s")
    _exit_with_parent(os.path.dirname(input_address.removeprefix("ipc://")))
    context = zmq.Context()
    try:
        input_socket = context.socket(zmq.PULL)
        input_socket.setsockopt(zmq.LINGER, 0)
        input_socket.connect(input_address)
        output_socket = context.socket(zmq.PUSH)
        output_socket.setsockopt(zmq.SNDHWM, 0)  # never block on a slow reader: the core only steps while read
        output_socket.setsockopt(zmq.LINGER, _OUTPUT_LINGER_MS)
        output_socket.connect(output_address)
        _serve(config, input_socket, output_socket)
    finally:
        context.destroy()  # each socket with its own linger: the last outputs (a StartupError) still go out


def _serve(config: EngineConfig, input_socket: zmq.Socket, output_socket: zmq.Socket) -> None:
    try:
        core = EngineCore.from_config(config)
    except Exception as error:
        logger.exception("the engine core failed to start")
        output_socket.send(msgspec.msgpack.encode(_startup_error(error)))
        return
    try:
        output_socket.send(msgspec.msgpack.encode(Ready(core.stats())))
        CoreLoop(core, input_socket, output_socket).run()
    finally:
        core.shutdown()


def _startup_error(error: Exception) -> StartupError:
    # The parent re-raises it as the nearest builtin class (a GGUFError is a ValueError there).
    kind = next(c for c in type(error).__mro__ if getattr(builtins, c.__name__, None) is c).__name__
    message = str(error) if kind == type(error).__name__ else f"{type(error).__name__}: {error}"
    return StartupError(kind, message, traceback.format_exc())


def _exit_with_parent(socket_dir: str) -> None:
    """Exit this process as soon as the parent dies, whatever the main thread is doing (loading, stepping)."""
    parent = multiprocessing.parent_process()
    if parent is None:  # not started by multiprocessing
        return

    def watch() -> None:
        # The sentinel is a pipe whose write end only the parent holds: it turns readable when the parent exits.
        wait([parent.sentinel])
        shutil.rmtree(socket_dir, ignore_errors=True)  # the dead parent's; nobody else will remove it
        os._exit(1)

    threading.Thread(target=watch, name="splitfuse-parent-watch", daemon=True).start()


class CoreLoop:
    """Applies input messages to an EngineCore and steps it while it has work; one instance per child."""

    def __init__(self, core: EngineCore, input_socket: zmq.Socket, output_socket: zmq.Socket) -> None:
        self.core = core
        self.input_socket = input_socket
        self.output_socket = output_socket
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(InputMessage)
        # An abort since the last step: step once more even if idle, so the freed blocks, the KV
        # events and the runner's forgetting of the aborted requests happen now, not at the next request.
        self._flush_pending = False

    def run(self) -> None:
        while True:
            busy = self.core.has_unfinished_requests() or self._flush_pending
            for message in self._receive_all(block=not busy):
                if isinstance(message, Shutdown):
                    return
                self._apply(message)
            if self.core.has_unfinished_requests() or self._flush_pending:
                self._step()

    def _receive_all(self, block: bool) -> list[InputMessage]:
        """Every message already queued; when ``block``, waits for the first one (and never times out)."""
        messages = []
        if block:
            messages.append(self._decoder.decode(self.input_socket.recv(copy=False).buffer))
        while True:
            try:
                frame = self.input_socket.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return messages
            messages.append(self._decoder.decode(frame.buffer))

    def _apply(self, message: InputMessage) -> None:
        if isinstance(message, AbortRequests):
            self.core.abort_requests(message.request_ids)
            self._flush_pending = True
            return
        refusal = self.core.add_or_refuse(message.requests)
        self._send(AddAck() if refusal is None else refusal)

    def _step(self) -> None:
        self._flush_pending = False
        result = self.core.step_or_abort()
        self._send(result if isinstance(result, EngineCoreError) else StepOutputs(result))

    def _send(self, message: OutputMessage) -> None:
        self.output_socket.send(self._encoder.encode(message))


def startup_exception(error: StartupError) -> Exception:
    """The child's startup error as an exception of its builtin kind (RuntimeError if that cannot be built)."""
    message = f"the engine core process failed to start: {error.message}"
    error_type = getattr(builtins, error.kind, None)
    if isinstance(error_type, type) and issubclass(error_type, Exception):
        try:
            return error_type(message)
        except TypeError:  # a class whose constructor wants more than a message (UnicodeDecodeError)
            pass
    return RuntimeError(message)
