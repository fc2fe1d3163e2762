"""LLMEngine: validates and admits requests, runs schedule -> forward -> update, and reports outputs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch

from splitfuse.config import EngineConfig
from splitfuse.engine.detokenizer import IncrementalDetokenizer
from splitfuse.engine.kv_cache import KVCacheManager
from splitfuse.engine.request import Request, RequestStatus
from splitfuse.engine.scheduler import Scheduler
from splitfuse.engine.setup import EngineSetup, resolve_setup
from splitfuse.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from splitfuse.sampling_params import SamplingParams
from splitfuse.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

PromptType = Union[str, list[int]]


@dataclass
class EngineStats:
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


@dataclass
class _RequestGroup:
    """One user request: its ``n`` sequences share the prompt."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    sequences: list[Request]
    metrics: RequestMetrics

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.sequences)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        setup: EngineSetup = resolve_setup(config)
        self.setup = setup
        self.tokenizer = setup.tokenizer
        self.arch = setup.arch
        self.max_model_len = setup.max_model_len
        self.vocab_size = setup.arch.vocab_size
        self.eos_token_ids = setup.eos_token_ids
        self.kv_cache = KVCacheManager(setup.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache)
        torch.manual_seed(config.model.seed)
        self.runner = ModelRunner(setup.model_path, setup.arch, dtype=setup.dtype, device=setup.device,
                                  num_blocks=setup.num_blocks, block_size=config.cache.block_size,
                                  eos_token_ids=setup.eos_token_ids, seed=config.model.seed,
                                  attention_backend=config.model.attention_backend,
                                  batch_invariant=config.model.batch_invariant,
                                  max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
                                  max_num_seqs=config.scheduler.max_num_seqs)
        self._groups: dict[str, _RequestGroup] = {}
        self._group_of: dict[str, _RequestGroup] = {}  # sequence id -> group
        self._arrival_counter = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.computed_tokens_total = 0
        logger.info("KV cache: %d blocks of %d tokens = %d tokens", setup.num_blocks,
                    config.cache.block_size, setup.num_blocks * config.cache.block_size)

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        return cls(config)

    @property
    def max_num_tokens_in_cache(self) -> int:
        return self.kv_cache.num_blocks * self.kv_cache.block_size

    # -- admission ------------------------------------------------------------------

    def encode_prompt(self, prompt: PromptType) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return self.tokenizer.encode(prompt)
        token_ids = list(prompt)
        if not token_ids:
            raise ValueError("prompt is empty")
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary (size {self.vocab_size})")
        return token_ids

    def resolve_max_tokens(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        """max_tokens as given, or all the context left; raises if the request cannot fit."""
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(prompt_too_long_message(num_prompt_tokens, self.max_model_len))
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - num_prompt_tokens
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
                             f"{num_prompt_tokens + max_tokens} exceeds the model's context length "
                             f"(max_model_len) of {self.max_model_len}")
        num_blocks = self.kv_cache.blocks_needed(num_prompt_tokens + max_tokens)
        if num_blocks > self.kv_cache.num_blocks:
            raise ValueError(f"request needs up to {num_prompt_tokens + max_tokens} tokens of KV cache, "
                             f"but the whole cache holds {self.max_num_tokens_in_cache}")
        return max_tokens

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: Optional[float] = None, priority: int = 0) -> None:
        """Queues a request; raises ValueError naming the problem (nothing is queued then)."""
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs is not supported yet")
        params.validate_for_vocab(self.vocab_size)
        prompt_token_ids = self.encode_prompt(prompt)
        max_tokens = self.resolve_max_tokens(len(prompt_token_ids), params)
        self._check_waiting_room(len(prompt_token_ids), params.n)

        arrival_time = time.time() if arrival_time is None else arrival_time
        self._arrival_counter += 1
        sequences: list[Request] = []
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            sequence = Request(
                request_id if params.n == 1 else f"{request_id}#{index}", prompt_token_ids, params,
                arrival_time=arrival_time, max_tokens=max_tokens, priority=priority,
                arrival_order=self._arrival_counter, eos_token_ids=self.eos_token_ids,
                prefill_leader=sequences[0] if sequences else None, seed=seed)
            if params.detokenize:
                sequence.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
            sequences.append(sequence)
        group = _RequestGroup(request_id, prompt if isinstance(prompt, str) else None, prompt_token_ids,
                              sequences, RequestMetrics(arrival_time=arrival_time,
                                                        num_prompt_tokens=len(prompt_token_ids)))
        self._groups[request_id] = group
        for sequence in sequences:
            self._group_of[sequence.request_id] = group
            self.scheduler.add_request(sequence)
        self.prompt_tokens_total += len(prompt_token_ids)

    def _check_waiting_room(self, num_prompt_tokens: int, num_sequences: int) -> None:
        """QueueFullError if the waiting queue cannot take one more request (max_waiting_requests / _tokens)."""
        config = self.config.scheduler
        waiting = self.scheduler.waiting
        if config.max_waiting_requests is not None and len(waiting) + num_sequences > config.max_waiting_requests:
            raise QueueFullError(f"the waiting queue is full ({config.max_waiting_requests} requests)")
        if config.max_waiting_tokens is None or not waiting:  # alone, any request that fits the context may wait
            return
        # A sibling (n > 1) finds its leader's prompt in the prefix cache: its prompt counts once.
        waiting_tokens = sum(r.num_tokens - r.num_computed_tokens for r in waiting if r.prefill_leader is None)
        if waiting_tokens + num_prompt_tokens > config.max_waiting_tokens:
            raise QueueFullError(f"the waiting queue is full ({waiting_tokens} tokens wait to be computed, "
                                 f"{num_prompt_tokens} more would pass the limit of {config.max_waiting_tokens})")

    def abort_request(self, request_ids: Union[str, Iterable[str]]) -> None:
        """Stops requests at once and frees their KV blocks; unknown ids are ignored."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for request_id in request_ids:
            group = self._groups.pop(request_id, None)
            if group is None:
                continue
            self.scheduler.finish_requests(group.sequences, RequestStatus.FINISHED_ABORTED)
            for sequence in group.sequences:
                self._group_of.pop(sequence.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    # -- one step ---------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedules, runs one forward, appends sampled tokens; returns outputs of requests that changed."""
        scheduled = self.scheduler.schedule()
        if not scheduled.requests:
            return []
        now = time.time()
        for request in scheduled.requests:
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
        block_tables = [self.kv_cache.get_block_table(r.request_id) for r in scheduled.requests]
        result = self.runner.execute(scheduled.requests, scheduled.num_new_tokens, block_tables)
        self.computed_tokens_total += scheduled.total_tokens
        self.scheduler.update_computed(scheduled)
        if result.sampler_output is None:
            return []
        now = time.time()
        changed: dict[str, _RequestGroup] = {}
        finished: list[Request] = []
        for row, request in enumerate(result.requests):
            token_id = result.sampler_output.token_ids[row]
            self._append_token(request, token_id, result.sampler_output.logprobs[row], now)
            if request.is_finished:
                finished.append(request)
            group = self._group_of[request.request_id]
            changed[group.request_id] = group
        for request in finished:
            self.scheduler.finish_requests([request], request.status)
        return [self._make_output(group, now) for group in changed.values()]

    def _append_token(self, request: Request, token_id: int, logprobs, now: float) -> None:
        request.append_output_token(token_id)
        self.generation_tokens_total += 1
        if request.first_token_time is None:
            request.first_token_time = now
        if logprobs is not None:
            request.logprobs.append(self._logprob_dict(token_id, logprobs))
            request.cumulative_logprob += logprobs[0]
        status = self._token_stop_status(request, token_id)
        if status is None and request.detokenizer is not None:
            # A token that ends the request (EOS, a stop token) is kept in token_ids, not in the text.
            stop_string = request.detokenizer.update([token_id])
            if stop_string is not None and request.num_output_tokens >= request.params.min_tokens:
                request.stop_reason = stop_string
                status = RequestStatus.FINISHED_STOPPED
        if status is None and (request.num_output_tokens >= request.max_tokens
                               or request.num_tokens >= self.max_model_len):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            request.status = status
            request.finished_time = now

    @staticmethod
    def _token_stop_status(request: Request, token_id: int) -> Optional[RequestStatus]:
        params = request.params
        if request.num_output_tokens < params.min_tokens:
            return None
        if token_id in request.eos_token_ids and not params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED
        if token_id in params.stop_token_ids:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        return None

    def _logprob_dict(self, token_id: int, logprobs) -> dict[int, Logprob]:
        chosen_logprob, chosen_rank, top_ids, top_logprobs = logprobs
        entries = {tid: Logprob(lp, rank + 1, self.tokenizer.decode([tid]))
                   for rank, (tid, lp) in enumerate(zip(top_ids, top_logprobs))}
        entries.setdefault(token_id, Logprob(chosen_logprob, chosen_rank, self.tokenizer.decode([token_id])))
        return {token_id: entries.pop(token_id), **entries}

    def _make_output(self, group: _RequestGroup, now: float) -> RequestOutput:
        outputs = []
        for index, sequence in enumerate(group.sequences):
            detokenizer = sequence.detokenizer
            outputs.append(CompletionOutput(
                index=index, text=detokenizer.output_text if detokenizer is not None else "",
                token_ids=list(sequence.output_token_ids),
                logprobs=list(sequence.logprobs) if sequence.params.logprobs is not None else None,
                cumulative_logprob=sequence.cumulative_logprob if sequence.params.logprobs is not None else None,
                finish_reason=sequence.status.value if sequence.is_finished else None,
                stop_reason=sequence.stop_reason))
        metrics = group.metrics
        leader = group.sequences[0]
        metrics.first_scheduled_time = leader.first_scheduled_time
        metrics.first_token_time = min((s.first_token_time for s in group.sequences if s.first_token_time),
                                       default=None)
        metrics.num_cached_tokens = max(leader.num_cached_tokens, 0)
        finished = group.finished
        if finished:
            metrics.finished_time = now
            self._groups.pop(group.request_id, None)
            for sequence in group.sequences:
                self._group_of.pop(sequence.request_id, None)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outputs, finished,
                             metrics, num_cached_tokens=metrics.num_cached_tokens)

    def get_stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_free_blocks=self.kv_cache.num_free_blocks, num_total_blocks=self.kv_cache.num_blocks,
            kv_cache_usage=self.kv_cache.usage, prefix_cache_queries=self.kv_cache.prefix_cache_queries,
            prefix_cache_hits=self.kv_cache.prefix_cache_hits, num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total, generation_tokens_total=self.generation_tokens_total,
            computed_tokens_total=self.computed_tokens_total)


def prompt_too_long_message(num_prompt_tokens: int, max_model_len: int) -> str:
    return (f"prompt has {num_prompt_tokens} tokens, but the model's context length (max_model_len) "
            f"is {max_model_len}")


class QueueFullError(ValueError):
    """The waiting queue is at ``max_waiting_requests`` or ``max_waiting_tokens``; the server answers 429."""
