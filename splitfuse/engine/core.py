"""EngineCore: the scheduler and an executor behind one plain-data contract (``engine/protocol.py``).

The core knows token ids, blocks and time, nothing else: no text, no global state. (The one part
that reads a token's bytes is structured output's grammar compiler, ``sample/grammar.py``: a mask
of allowed tokens is made from them.) It is built from parts — ``EngineCore(scheduler, executor, clock)`` — so the same loop
runs the real model (``EngineCore.from_config``), a fake executor on a virtual clock (tests,
the simulator), in this thread or in another process (``engine/core_client.py``).

Contract: ``add_requests`` queues a group of sequences whole or raises (ValueError, or
QueueFullError when the waiting queue is at its limits) with nothing queued; ``step`` runs
schedule -> execute -> update once and returns what is new; ``abort_requests`` frees at once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable, Optional

from splitfuse.config import EngineConfig
from splitfuse.clock import Clock, WallClock
from splitfuse.engine.input_processor import check_fits_cache
from splitfuse.engine.kv_cache import KVCacheManager
from splitfuse.engine.protocol import EngineCoreError, EngineCoreOutputs, EngineCoreRequest, SchedulerStats
from splitfuse.engine.request import Request, RequestStatus
from splitfuse.engine.scheduler import Scheduler
from splitfuse.worker.executor import Executor

if TYPE_CHECKING:
    from splitfuse.engine.resolved_config import ResolvedConfig

logger = logging.getLogger(__name__)


class QueueFullError(ValueError):
    """The waiting queue is at ``max_waiting_requests`` or ``max_waiting_tokens``; the server answers 429."""


class EngineCore:
    def __init__(self, scheduler: Scheduler, executor: Executor, clock: Optional[Clock] = None) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.clock = clock or WallClock()
        self._arrival_counter = 0
        self.num_steps = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.computed_tokens_total = 0

    @classmethod
    def from_config(cls, config: EngineConfig, resolved: Optional[ResolvedConfig] = None) -> "EngineCore":
        """The real engine: the checkpoint's model in a ModelRunner, on the wall clock."""
        from splitfuse.engine.resolved_config import resolve_config
        from splitfuse.sample.grammar import GrammarCompiler
        from splitfuse.worker.executor import UniProcExecutor
        from splitfuse.worker.model_runner import ModelRunner

        setup = resolved or resolve_config(config)
        runner = ModelRunner(setup.model_path, setup.arch, dtype=setup.dtype, device=setup.device,
                             num_blocks=setup.num_blocks, block_size=config.cache.block_size,
                             eos_token_ids=setup.eos_token_ids, seed=config.model.seed,
                             attention_backend=config.model.attention_backend,
                             batch_invariant=config.model.batch_invariant,
                             max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
                             max_num_seqs=config.scheduler.max_num_seqs,
                             draft_model_path=setup.draft_model_path, draft_arch=setup.draft_arch,
                             gpu_memory_utilization=config.cache.gpu_memory_utilization,
                             enforce_eager=config.model.enforce_eager, max_model_len=setup.max_model_len)
        # The runner knows the pool's size: the configured one, or on CUDA what profiling left room for.
        kv_cache = KVCacheManager(runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        grammar_compiler = GrammarCompiler(setup.tokenizer, setup.arch.vocab_size, sorted(setup.eos_token_ids))
        scheduler = Scheduler(config.scheduler, kv_cache, eos_token_ids=setup.eos_token_ids,
                              max_model_len=setup.max_model_len, grammar_compiler=grammar_compiler)
        logger.info("KV cache: %d blocks of %d tokens = %d tokens", runner.num_blocks,
                    config.cache.block_size, runner.num_blocks * config.cache.block_size)
        return cls(scheduler, UniProcExecutor(runner))

    # -- requests -----------------------------------------------------------------------

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        """Queues every sequence of one request (n > 1: a leader and its siblings), or none of them."""
        kv_cache = self.scheduler.kv_cache
        for request in requests:
            if request.request_id in self.scheduler.requests:
                raise ValueError(f"request id {request.request_id!r} is already in use")
            # The frontend checks this too where it knows the pool's size (not on CUDA before profiling).
            check_fits_cache(len(request.prompt_token_ids) + request.max_tokens,
                             kv_cache.num_blocks * kv_cache.block_size)
        self._check_waiting_room(requests)
        self._arrival_counter += 1
        for request in requests:
            self.scheduler.add_request(Request(
                request.request_id, request.prompt_token_ids, request.sampling_params,
                arrival_time=request.arrival_time, max_tokens=request.max_tokens, priority=request.priority,
                arrival_order=self._arrival_counter, tenant=request.tenant,
                prefill_leader_id=request.prefill_leader_id, seed=request.seed))
        self.prompt_tokens_total += len(requests[0].prompt_token_ids) if requests else 0

    def _check_waiting_room(self, requests: list[EngineCoreRequest]) -> None:
        config = self.scheduler.config
        waiting = self.scheduler.waiting
        if config.max_waiting_requests is not None and len(waiting) + len(requests) > config.max_waiting_requests:
            raise QueueFullError(f"the waiting queue is full ({config.max_waiting_requests} requests)")
        if config.max_waiting_tokens is None or not waiting:  # alone, any request that fits the context may wait
            return
        # A sibling (n > 1) finds its leader's prompt in the prefix cache: a group's prompt counts once.
        waiting_tokens = sum(r.num_tokens - r.num_computed_tokens for r in waiting if r.prefill_leader_id is None)
        num_prompt_tokens = sum(len(r.prompt_token_ids) for r in requests if r.prefill_leader_id is None)
        if waiting_tokens + num_prompt_tokens > config.max_waiting_tokens:
            raise QueueFullError(f"the waiting queue is full ({waiting_tokens} tokens wait to be computed, "
                                 f"{num_prompt_tokens} more would pass the limit of {config.max_waiting_tokens})")

    def add_or_refuse(self, requests: list[EngineCoreRequest]) -> Optional[EngineCoreError]:
        """``add_requests`` with its refusal as data, for a core driven from another process or machine.

        The error's kind names the exception (QueueFullError, ValueError, or a bug's TypeError...).
        """
        try:
            self.add_requests(requests)
        except Exception as error:  # refused with nothing queued
            kind = "QueueFullError" if isinstance(error, QueueFullError) else type(error).__name__
            return EngineCoreError(str(error), [r.request_id for r in requests], kind)
        return None

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        """Stops requests at once and frees their KV blocks; unknown or finished ids are ignored."""
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # -- one step -----------------------------------------------------------------------

    def step(self) -> EngineCoreOutputs:
        """schedule -> execute -> update; the outputs of requests that got tokens (or finished)."""
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            # The runner's copies follow from every message: it still hears of finished and preempted
            # requests and KV operations when no token is computed.
            if (scheduler_output.finished_request_ids or scheduler_output.preempted_request_ids
                    or scheduler_output.kv_operations):
                self.executor.execute_model(scheduler_output)
            return EngineCoreOutputs(self.scheduler.take_grammar_failures(), self.clock.now(),
                                     self.scheduler.kv_cache.take_events(), self.stats())
        started = self.clock.now()
        runner_output = self.executor.execute_model(scheduler_output)
        now = self.clock.now()
        self.num_steps += 1
        self.computed_tokens_total += scheduler_output.total_num_scheduled_tokens
        outputs = self.scheduler.take_grammar_failures()
        outputs += self.scheduler.update_from_output(scheduler_output, runner_output, started)
        self.generation_tokens_total += sum(len(o.new_token_ids) for o in outputs)
        return EngineCoreOutputs(outputs, now, self.scheduler.kv_cache.take_events(), self.stats())

    def step_or_abort(self) -> EngineCoreOutputs | EngineCoreError:
        """``step``; if it raises, every unfinished request is aborted (the step may have left any of them
        half-updated) and the failure comes back as a StepError naming them, so the core serves on."""
        try:
            return self.step()
        except Exception as error:
            request_ids = list(self.scheduler.requests)
            logger.exception("engine step failed; aborting %d request(s)", len(request_ids))
            self.abort_requests(request_ids)  # if this raises too, the core's owner sees it
            return EngineCoreError(f"the engine failed while running this request: {error!r}", request_ids,
                                   "StepError")

    def stats(self) -> SchedulerStats:
        scheduler, kv_cache = self.scheduler, self.scheduler.kv_cache
        speculated = scheduler.speculator.stats if scheduler.speculator is not None else None
        return SchedulerStats(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            num_free_blocks=kv_cache.num_free_blocks, num_total_blocks=kv_cache.num_blocks,
            kv_cache_usage=kv_cache.usage, prefix_cache_queries=kv_cache.prefix_cache_queries,
            prefix_cache_hits=kv_cache.prefix_cache_hits, num_preemptions=scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total, generation_tokens_total=self.generation_tokens_total,
            computed_tokens_total=self.computed_tokens_total, num_steps=self.num_steps,
            num_waiting_tokens=sum(r.num_tokens - r.num_computed_tokens for r in scheduler.waiting),
            spec_draft_tokens_total=speculated.draft_tokens if speculated else 0,
            spec_accepted_tokens_total=speculated.accepted_tokens if speculated else 0)

    def shutdown(self) -> None:
        self.executor.shutdown()
        if self.scheduler.grammar_compiler is not None:
            self.scheduler.grammar_compiler.shutdown()
