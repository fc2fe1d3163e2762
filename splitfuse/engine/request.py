"""Request: one sequence's state as the scheduler sees it — tokens known, tokens computed, blocks held.

Plain data (no torch, no tokenizer): a request can be rebuilt from its ``EngineCoreRequest``
and the tokens generated so far, which is what preemption, migration and a separate-process
core need.
"""

from __future__ import annotations

import enum
from typing import Optional

from splitfuse.engine.kv_cache.hashing import BlockHash
from splitfuse.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again after its blocks were freed
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


class Request:
    """There is no prefill or decode phase: a request has ``num_tokens`` known tokens
    (prompt + generated) of which ``num_computed_tokens`` have KV in the cache. Each
    step the scheduler gives it some of the rest; when all known tokens are computed,
    the step samples its next token.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 *, arrival_time: float, max_tokens: int, priority: int = 0, arrival_order: int = 0,
                 tenant: Optional[str] = None, prefill_leader_id: Optional[str] = None,
                 seed: Optional[int] = None) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.arrival_time = arrival_time
        self.max_tokens = max_tokens
        self.priority = priority
        self.arrival_order = arrival_order
        self.tenant = tenant
        # A sibling (n > 1) waits until its leader has computed the shared prompt,
        # then finds those blocks in the prefix cache instead of computing them again.
        self.prefill_leader_id = prefill_leader_id
        self.seed = seed  # the runner's generator for this sequence starts from it (None: the batch's)

        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prompt tokens found in the prefix cache at first schedule
        self.status = RequestStatus.WAITING
        self.block_hashes: list[BlockHash] = []
        self.num_preemptions = 0
        self.stop_reason: Optional[int | str] = None
        self.first_scheduled_time: Optional[float] = None
        # What the runner holds of this request: None until it is sent whole; else how many tokens it knows.
        self.num_tokens_in_runner: Optional[int] = None
        self.num_blocks_in_runner = 0
        self.known_to_runner = False  # the runner keeps state for it (a preempted one's generator too)
        # Structured output: the compile in flight, then the request's own grammar matcher (sample/grammar.py).
        self.grammar_future = None
        self.matcher = None
        # prompt_logprobs: scored by the leader only (siblings share its prompt), collected as chunks compute.
        self.wants_prompt_logprobs = params.prompt_logprobs is not None and prefill_leader_id is None
        self.prompt_logprobs: list = []
        self.spec_acceptance = 1.0  # speculative decoding: recent share of draft tokens accepted (engine/speculative.py)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether prompt tokens are still to be scored (so its prompt must be computed, not found cached)."""
        return self.wants_prompt_logprobs and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.value})")
