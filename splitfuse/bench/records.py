"""RequestRecord: what the load generator saw for one request (send time, token arrival times, counts, error)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class RequestRecord:
    """One request as the client observed it; all times in seconds since the run started.

    ``token_times_s`` holds one timestamp per SSE chunk that carried text. A server
    that packs k tokens into one chunk gives one timestamp for those k tokens, so
    TBT gaps are then gaps between chunks; ``output_tokens`` still counts tokens
    (from the final ``usage`` chunk when the server sends one, else one per chunk;
    ``output_tokens_source`` says which).

    A request failed when ``error`` is set; ``timed_out`` marks the failures that
    were the client's own per-request time limit. Failed requests stay in the
    results: they are counted, never dropped.
    """

    request_id: int
    prompt_tokens: int
    requested_output_tokens: int
    send_time_s: float
    token_times_s: list[float] = field(default_factory=list)
    end_time_s: Optional[float] = None
    output_tokens: int = 0
    output_tokens_source: str = "chunks"  # "usage" or "chunks"
    server_prompt_tokens: Optional[int] = None
    error: Optional[str] = None
    timed_out: bool = False
    conversation_id: Optional[int] = None
    turn: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft_s(self) -> Optional[float]:
        """Send to first output token (queueing and prefill included)."""
        if not self.token_times_s:
            return None
        return self.token_times_s[0] - self.send_time_s

    @property
    def e2e_s(self) -> Optional[float]:
        """Send to last output token."""
        if not self.token_times_s:
            return None
        return self.token_times_s[-1] - self.send_time_s

    @property
    def tpot_s(self) -> Optional[float]:
        """(last token − first token) / (output tokens − 1); None for fewer than 2 tokens."""
        if len(self.token_times_s) < 1 or self.output_tokens < 2:
            return None
        return (self.token_times_s[-1] - self.token_times_s[0]) / (self.output_tokens - 1)

    @property
    def tbt_gaps_s(self) -> list[float]:
        """Gaps between consecutive token (chunk) arrivals: [t1-t0, t2-t1, ...]."""
        times = self.token_times_s
        return [later - earlier for earlier, later in zip(times, times[1:])]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RequestRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})
