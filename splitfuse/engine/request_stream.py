"""RequestStream: one request's outputs on the event loop — DELTA outputs from the engine thread, added up.

``AsyncLLMEngine`` (``engine/async_engine.py``) creates and feeds it; callers iterate it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Optional

from splitfuse.outputs import CompletionOutput, RequestOutput

if TYPE_CHECKING:
    from splitfuse.engine.async_engine import AsyncLLMEngine


class RequestStream:
    """The outputs of one request, as an async iterator of cumulative ``RequestOutput``s.

    The engine thread sends DELTA outputs (only what is new, so it never copies a request's
    whole token list); the stream adds them up here, on the event loop, into its own lists.
    So a slow consumer needs no backlog: one that lags three steps wakes once and sees all
    three steps' tokens. Each output handed out has the text so far (never a partial stop
    string or an unfinished character) and the stream's token and logprob lists, which keep
    growing after it is handed out. Iteration ends after the finished output.
    Lives on the event loop; only ``AsyncLLMEngine`` feeds it.
    """

    def __init__(self, request_id: str, engine: "AsyncLLMEngine", arrival_time: float) -> None:
        self.request_id = request_id
        self.arrival_time = arrival_time
        self._engine = engine
        self._latest: Optional[RequestOutput] = None  # the newest delta (its metrics, prompt, finished flag)
        self._completions: dict[int, CompletionOutput] = {}  # index -> the running total
        self._pending = False  # deltas arrived since the consumer last took an output
        self._error: Optional[BaseException] = None
        self._wakeup = asyncio.Event()
        self._accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.finished = False  # the finished output was delivered (or the stream failed)
        self._exhausted = False
        # Latency bookkeeping (event-loop clock), for the observer.
        self._first_token_time: Optional[float] = None
        self._last_token_time: Optional[float] = None
        self._num_positions = 0

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            if self._pending:
                self._pending = False
                output = self._snapshot()
                if output.finished:
                    self._exhausted = True
                return output
            if self._error is not None:
                error, self._error = self._error, None
                self._exhausted = True
                raise error
            if self._exhausted:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    def abort(self) -> None:
        """Stop the request now (frees its KV blocks); a no-op once it has finished."""
        self._engine.abort(self.request_id)

    # Called on the event loop by AsyncLLMEngine.
    def _put(self, delta: RequestOutput) -> None:
        for piece in delta.outputs:
            total = self._completions.get(piece.index)
            if total is None:
                self._completions[piece.index] = dataclasses.replace(
                    piece, token_ids=list(piece.token_ids),
                    logprobs=None if piece.logprobs is None else list(piece.logprobs))
                continue
            total.text += piece.text
            total.token_ids.extend(piece.token_ids)
            if piece.logprobs is not None and total.logprobs is not None:
                total.logprobs.extend(piece.logprobs)
            total.cumulative_logprob = piece.cumulative_logprob
            total.finish_reason, total.stop_reason = piece.finish_reason, piece.stop_reason
        self._latest = delta
        self._pending = True
        if delta.finished:
            self.finished = True
        self._wakeup.set()

    def _snapshot(self) -> RequestOutput:
        latest = self._latest
        completions = [dataclasses.replace(c) for _, c in sorted(self._completions.items())]
        return RequestOutput(latest.request_id, latest.prompt, latest.prompt_token_ids, completions,
                             latest.finished, latest.metrics, num_cached_tokens=latest.num_cached_tokens,
                             prompt_logprobs=latest.prompt_logprobs)

    @property
    def num_output_positions(self) -> int:
        """The longest choice's token count so far."""
        return max((len(c.token_ids) for c in self._completions.values()), default=0)

    def _fail(self, error: BaseException) -> None:
        self.finished = True
        if not self._accepted.done():
            self._accepted.set_exception(error)
            return
        self._error = error
        self._wakeup.set()
