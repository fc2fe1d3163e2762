"""What the engine hands back: per-request outputs, logprobs and timings."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional


class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a request holds.

    CUMULATIVE: everything so far. ``token_ids`` and ``logprobs`` are the request's own lists,
    which keep growing after the output is handed out (no copy per step); ``text`` is a snapshot.
    DELTA: only what is new since the previous output (the text never ends in a partial stop
    string or an unfinished character). FINAL_ONLY: one output, when the request finishes.
    """

    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL_ONLY = "final_only"


@dataclass
class Logprob:
    """Log-probability of one token (log-softmax of the raw logits) and its rank (1 = most likely)."""

    logprob: float
    rank: int
    decoded_token: Optional[str] = None


# One dict per generated position: token id -> Logprob (the chosen token and the top-N).
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.time()) of one request's life."""

    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first schedule
    num_discarded_tokens: int = 0  # tokens of the best_of sequences not returned (generated, so billed)

    @property
    def ttft_s(self) -> Optional[float]:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e_latency_s(self) -> Optional[float]:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclass
class CompletionOutput:
    """One of the ``n`` sequences of a request."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: Optional[SampleLogprobs] = None
    cumulative_logprob: Optional[float] = None
    finish_reason: Optional[str] = None  # "stop", "length", "abort" or None while running
    stop_reason: Optional[int | str] = None  # the stop string or token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = field(default=None)
