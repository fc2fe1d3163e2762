"""EngineCoreClient: how a frontend drives an EngineCore — in this thread, or in another process.

One typed protocol for every way to run the core, so ``LLMEngine`` (and the server above it)
does not know which one it has:

- ``InProcClient``: the core lives in the calling thread; ``get_output`` runs one step.
- ``MPClient`` (``engine/core_process.py``): the core steps in its own process, fed over
  ZeroMQ with msgpack; ``get_output`` returns its next step's results.

Only one thread may call a client (the AsyncLLMEngine's engine thread, or the offline LLM).
"""

from __future__ import annotations

from typing import Iterable, Optional, Protocol

from splitfuse.engine.core import EngineCore
from splitfuse.engine.protocol import EngineCoreOutputs, EngineCoreRequest, SchedulerStats


class EngineCoreClient(Protocol):
    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        """Queues one request's sequences, or raises ValueError / QueueFullError with nothing queued."""
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

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.engine_core.abort_requests(request_ids)

    def get_output(self) -> EngineCoreOutputs:
        return self.engine_core.step()

    def stats(self) -> SchedulerStats:
        return self.engine_core.stats()

    def shutdown(self) -> None:
        self.engine_core.shutdown()
