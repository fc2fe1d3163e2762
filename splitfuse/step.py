"""One engine step as plain data: ``SchedulerOutput`` from the scheduler to the runner, ``ModelRunnerOutput`` back.

The scheduler (``engine/``) and the model runner (``worker/``) share nothing else: the runner
never sees a ``Request``, only what changed since the step before. A request the runner has
not seen comes whole (``NewRequestData``); one it holds comes as a diff (``CachedRequestData``):
the tokens accepted since, the blocks added, and how many tokens have KV. So the runner's
copy of every request is a pure function of these messages, and a runner in another process
(prefill/decode roles, a simulator) can be fed the same bytes.

Worked example (block_size 4, budget 8): step 1 admits "a" (prompt [5, 6, 7, 8, 9, 10]) whole:
``new_requests=[NewRequestData("a", [5..10], ..., block_ids=[0, 1], num_computed_tokens=0)]``,
``num_scheduled_tokens={"a": 6}``, ``sampling_request_ids=["a"]``; the runner samples 11.
Step 2: ``cached_requests=[CachedRequestData("a", new_token_ids=[11], new_block_ids=[],
num_computed_tokens=6)]``, ``num_scheduled_tokens={"a": 1}``.
"""

from __future__ import annotations

from typing import Optional

import msgspec

from splitfuse.sampling_params import SamplingParams

# (chosen token's logprob, its 1-based rank, top-k token ids, top-k logprobs) of one sampled token
TokenLogprobs = tuple[float, int, list[int], list[float]]


class NewRequestData(msgspec.Struct, array_like=True, omit_defaults=True):
    """A request the runner does not hold: first scheduled, or resumed after preemption (all its tokens)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty when it resumes after a preemption (recomputed, not re-sampled)
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # prefix-cache hits: tokens whose KV is already in block_ids
    seed: Optional[int] = None  # this sequence's own generator seed (n > 1: params.seed + index)


class CachedRequestData(msgspec.Struct, array_like=True, omit_defaults=True):
    """What changed for a request the runner holds, since the last step that scheduled it."""

    request_id: str
    new_token_ids: list[int]  # tokens the scheduler accepted since (the runner does not append its own samples)
    new_block_ids: list[int]  # appended to its block table
    num_computed_tokens: int


class KVOperation(msgspec.Struct, array_like=True, tag=True):
    """Moves KV blocks before the forward: ``kind`` is copy, swap_in, swap_out, send or receive.

    No scheduler issues one yet; live migration, swap and prefill/decode roles will.
    """

    kind: str
    src_block_ids: list[int]
    dst_block_ids: list[int]
    peer: Optional[str] = None


class SchedulerOutput(msgspec.Struct, omit_defaults=True):
    """Everything the runner needs for one step. Batch order is the runner's choice."""

    new_requests: list[NewRequestData] = msgspec.field(default_factory=list)
    cached_requests: list[CachedRequestData] = msgspec.field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = msgspec.field(default_factory=dict)  # every scheduled request
    # Requests whose last known token is computed this step, so they sample (the one place this is decided).
    sampling_request_ids: list[str] = msgspec.field(default_factory=list)
    finished_request_ids: list[str] = msgspec.field(default_factory=list)  # since the last step: forget them
    preempted_request_ids: list[str] = msgspec.field(default_factory=list)  # blocks freed; they come back new
    kv_operations: list[KVOperation] = msgspec.field(default_factory=list)
    # Structured output: the sampling requests under a grammar, and their next-token masks, one int32 row of
    # ceil(vocab / 32) words each (token t allowed iff bit t % 32 of word t // 32 is set), rows in this order.
    grammar_request_ids: list[str] = msgspec.field(default_factory=list)
    grammar_bitmask: bytes = b""
    # Speculative decoding: draft tokens scheduled after a request's last known token (counted in
    # num_scheduled_tokens); the runner verifies them and answers the accepted ones plus one more.
    spec_token_ids: dict[str, list[int]] = msgspec.field(default_factory=dict)
    # speculative_method="draft": how many drafts the runner's draft model proposes (counted likewise).
    spec_num_drafts: dict[str, int] = msgspec.field(default_factory=dict)

    def num_drafts(self, request_id: str) -> int:
        """The draft tokens scheduled for a request this step, whichever proposer made them."""
        return len(self.spec_token_ids.get(request_id, ())) or self.spec_num_drafts.get(request_id, 0)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


class ModelRunnerOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """The tokens drawn this step, one row per sampling request (any number of tokens per row: with draft
    tokens, the accepted drafts and the token drawn after them)."""

    request_ids: list[str] = msgspec.field(default_factory=list)
    sampled_token_ids: list[list[int]] = msgspec.field(default_factory=list)
    # Per row, per token; None for a row whose request asked for no logprobs.
    logprobs: list[Optional[list[TokenLogprobs]]] = msgspec.field(default_factory=list)
    # prompt_logprobs: request id -> (index of the first prompt token scored, one entry per prompt token from
    # there): each prompt token's logprob given the tokens before it, for the chunk computed this step.
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = msgspec.field(default_factory=dict)
