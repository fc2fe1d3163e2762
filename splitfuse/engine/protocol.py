"""The EngineCore contract: ``EngineCoreRequest`` in, ``EngineCoreOutputs`` out, each step — msgspec structs.

Everything here is plain data that msgpack encodes in microseconds, so the same core runs in
this thread, in another process (``engine/core_client.py``) or under a simulator. The core
knows token ids only: text, stop strings and logprob decoding belong to the frontend
(``engine/output_processor.py``), which aborts a request in the core when it sees a stop string.
"""

from __future__ import annotations

from typing import Optional, Union

import msgspec

from splitfuse.sampling_params import SamplingParams
from splitfuse.step import TokenLogprobs


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    """One sequence to generate (a request with ``n`` choices is ``n`` of these, siblings of a leader)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    max_tokens: int  # resolved: never None, prompt + max_tokens fits the context
    priority: int = 0
    tenant: Optional[str] = None
    seed: Optional[int] = None  # this sequence's generator seed
    prefill_leader_id: Optional[str] = None  # a sibling waits until this request has computed the prompt


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """What is new for one request after one step."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: Optional[list[TokenLogprobs]] = None  # one per new token, when the request asked
    finish_reason: Optional[str] = None  # "stop" (EOS or a stop token), "length" or "abort"
    stop_reason: Union[int, str, None] = None  # the stop token id that ended it
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    first_scheduled_time: Optional[float] = None  # on a request's first output only (core clock)
    # On a request's first output, when it asked for prompt_logprobs: prompt tokens 1.. given those before.
    prompt_logprobs: Optional[list[TokenLogprobs]] = None


class BlockStored(msgspec.Struct, array_like=True, tag=True):
    """Full blocks whose KV is now computed and findable by these chained hashes (``parent`` precedes the first)."""

    block_hashes: list[bytes]
    block_ids: list[int]
    parent_block_hash: Optional[bytes] = None


class BlockRemoved(msgspec.Struct, array_like=True, tag=True):
    """Blocks evicted from the prefix cache: these hashes no longer hit."""

    block_hashes: list[bytes]


KVEvent = Union[BlockStored, BlockRemoved]


class SchedulerStats(msgspec.Struct, array_like=True):
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    kv_cache_usage: float
    prefix_cache_queries: int  # tokens looked up
    prefix_cache_hits: int     # tokens found
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    computed_tokens_total: int  # tokens that went through the model (prefix-cache hits excluded)
    num_steps: int = 0
    num_waiting_tokens: int = 0  # prompt tokens the waiting requests still have to compute (a router's load signal)
    spec_draft_tokens_total: int = 0  # speculative decoding: draft tokens verified ...
    spec_accepted_tokens_total: int = 0  # ... and accepted
    # With replicas (engine/replica_client.py): which are up, and the router's decisions by reason so far.
    replicas_up: Optional[dict[str, bool]] = None
    routing_decisions: Optional[dict[str, int]] = None


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True):
    """One step's results: new tokens per request, KV events, and the scheduler's numbers after it."""

    outputs: list[EngineCoreOutput] = msgspec.field(default_factory=list)
    timestamp: float = 0.0  # core clock when the step ended
    kv_events: list[KVEvent] = msgspec.field(default_factory=list)
    scheduler_stats: Optional[SchedulerStats] = None


class EngineCoreError(msgspec.Struct, array_like=True, tag=True):
    """A request the core refused, or a step that failed (``request_ids`` are aborted)."""

    message: str
    request_ids: list[str] = msgspec.field(default_factory=list)
    kind: str = "ValueError"  # ValueError, QueueFullError or StepError
