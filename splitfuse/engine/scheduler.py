"""Scheduler: each step, hands out a token budget — running requests first, then waiting ones.

One control signal (Dynamic SplitFuse / Sarathi-Serve): ``max_num_batched_tokens``.
A running request costs 1 token if it decodes, or its next prompt chunk; waiting
requests fill what is left, a long prompt split over several steps. When KV blocks
run out, the policy's victim among the unscheduled running requests is preempted by
recompute: its blocks are freed and it waits again, keeping its place and its tokens.

``schedule`` returns a ``SchedulerOutput`` (plain data, ``splitfuse/step.py``);
``update_from_output`` takes the runner's sampled tokens back, decides which are accepted
(EOS, stop tokens, max_tokens, the context length: the one place these are checked) and
returns what is new per request.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import logging
from typing import TYPE_CHECKING, Iterable, Optional

import numpy as np

from splitfuse.config import SchedulerConfig
from splitfuse.engine.kv_cache import KVCacheManager
from splitfuse.engine.policy import SchedulingPolicy, make_policy
from splitfuse.engine.protocol import EngineCoreOutput
from splitfuse.engine.request import Request, RequestStatus
from splitfuse.engine.speculative import Speculator
from splitfuse.step import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput

if TYPE_CHECKING:
    from splitfuse.sample.grammar import GrammarCompiler

logger = logging.getLogger(__name__)

# With nothing to run but grammars compiling, schedule() waits this long for one (no busy loop of empty steps).
_GRAMMAR_WAIT_S = 0.005


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager, *,
                 eos_token_ids: frozenset[int] = frozenset(), max_model_len: Optional[int] = None,
                 policy: Optional[SchedulingPolicy] = None,
                 grammar_compiler: Optional[GrammarCompiler] = None) -> None:
        self.config = config
        self.grammar_compiler = grammar_compiler
        self.speculator = Speculator(config, max_model_len) if config.speculative_method else None
        self.kv_cache = kv_cache
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.policy = policy or make_policy(config.policy)
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.running: list[Request] = []  # admission order
        self.waiting: list[Request] = []  # sorted by the policy's sort_key
        self.num_preemptions = 0
        self._finished_ids: list[str] = []  # finished since the last schedule: the runner forgets them
        self._grammar_failures: list[str] = []  # aborted since the last update: their grammar did not compile

    # -- queue management ---------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        spec = request.params.structured_outputs
        if spec is not None:
            if self.grammar_compiler is None:
                raise ValueError("structured output needs an engine with a tokenizer (this one has none)")
            request.grammar_future = self.grammar_compiler.submit(spec)  # compiles off this thread
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self._enqueue_waiting(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Takes requests out of whichever queue holds them and frees their blocks; unknown ids are ignored."""
        finished = []
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._free(request)
            finished.append(request)
        return finished

    def _free(self, request: Request) -> None:
        self.kv_cache.free(request)
        if request.known_to_runner:
            self._finished_ids.append(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def _enqueue_waiting(self, request: Request) -> None:
        keys = [self.policy.sort_key(r) for r in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, self.policy.sort_key(request)), request)

    # -- one step -----------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(output, budget)
        if not output.preempted_request_ids:
            self._schedule_waiting(output, budget)
        if output.is_empty and not self.running:
            self._wait_for_a_grammar()
        self._add_grammar_bitmask(output)
        return output

    def _grammar_pending(self, request: Request) -> bool:
        """Whether the request still waits for its grammar; a grammar that failed to compile ends it."""
        future = request.grammar_future
        if future is None:
            return False
        if not future.done():
            return True
        request.grammar_future = None
        try:
            request.matcher = future.result()
        except Exception as error:  # the frontend checked the constraint, so this is rare: end, do not crash
            logger.error("request %s: its grammar failed to compile: %s", request.request_id, error)
            self.finish_requests([request.request_id], RequestStatus.FINISHED_ABORTED)
            self._grammar_failures.append(request.request_id)
        return False

    def take_grammar_failures(self) -> list[EngineCoreOutput]:
        """The requests ended since the last call because their grammar did not compile, as outputs."""
        failures, self._grammar_failures = self._grammar_failures, []
        return [EngineCoreOutput(request_id, [], finish_reason=RequestStatus.FINISHED_ABORTED.value)
                for request_id in failures]

    def _wait_for_a_grammar(self) -> None:
        pending = [r.grammar_future for r in self.waiting if r.grammar_future is not None]
        if pending:
            concurrent.futures.wait(pending, timeout=_GRAMMAR_WAIT_S, return_when=concurrent.futures.FIRST_COMPLETED)

    def _add_grammar_bitmask(self, output: SchedulerOutput) -> None:
        """Next-token masks of the requests that sample this step under a grammar (computed here, on the
        core's thread, from each matcher's state after the tokens accepted so far), one per sampling
        request, then one per draft token: a request's id appears once per row, its rows in order."""
        if self.grammar_compiler is None:
            return
        constrained = [self.requests[request_id] for request_id in output.sampling_request_ids
                       if self.requests[request_id].matcher is not None]
        if not constrained:
            return
        from splitfuse.sample.grammar import bitmask_words

        words = bitmask_words(self.grammar_compiler.vocab_size)
        bitmask = np.empty((len(constrained), words), dtype=np.int32)
        self.grammar_compiler.fill_bitmask([r.matcher for r in constrained], bitmask)
        request_ids = [r.request_id for r in constrained]
        # With drafts, a row more per draft: the mask after it (the matcher goes through them, then back).
        extra_rows, extra_ids = [], []
        for request in constrained:
            drafts = output.spec_token_ids.get(request.request_id, [])
            if not drafts:
                continue
            rows = np.empty((len(drafts), words), dtype=np.int32)
            for j, token_id in enumerate(drafts):
                request.matcher.consume_token(token_id)
                self.grammar_compiler.fill_bitmask([request.matcher], rows[j:j + 1])
            request.matcher.rollback(len(drafts))
            extra_rows.append(rows)
            extra_ids += [request.request_id] * len(drafts)
        output.grammar_request_ids = request_ids + extra_ids
        output.grammar_bitmask = b"".join([bitmask.tobytes()] + [rows.tobytes() for rows in extra_rows])

    def _schedule_running(self, output: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            num_drafts, draft_ids = 0, []
            if self.speculator is not None and num_new == request.num_tokens - request.num_computed_tokens == 1:
                num_drafts, draft_ids = self.speculator.drafts(request, budget - 1, len(self.running))
                if num_drafts and not self.kv_cache.allocate_slots(request, 1 + num_drafts):
                    num_drafts, draft_ids = 0, []  # drafts never preempt anyone: without room the request decodes
            if not self._allocate_or_preempt(request, num_new + num_drafts, index, output):
                # The request was its own victim (it left self.running, so index is the next one). Running
                # order is admission order, not the policy's: the ones after it may rank higher, and fit now.
                continue
            if draft_ids:
                output.spec_token_ids[request.request_id] = draft_ids
            elif num_drafts:
                output.spec_num_drafts[request.request_id] = num_drafts  # the runner's draft model proposes them
            self._add_to_output(output, request, num_new + num_drafts, num_drafts)
            budget -= num_new + num_drafts
            index += 1
        return budget

    def _allocate_or_preempt(self, request: Request, num_new: int, index: int,
                             output: SchedulerOutput) -> bool:
        """Allocates room for ``request``, preempting unscheduled running requests as needed.

        Only requests at or after ``index`` (not yet scheduled this step) are candidates,
        so a preemption never takes back what this step already promised.
        """
        while not self.kv_cache.allocate_slots(request, num_new):
            victim = self.policy.victim(self.running[index:])
            self._preempt(victim)
            output.preempted_request_ids.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        request.num_tokens_in_runner = None  # it comes back to the runner whole
        self.num_preemptions += 1
        self._enqueue_waiting(request)

    def _schedule_waiting(self, output: SchedulerOutput, budget: int) -> None:
        index = 0
        while index < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[index]
            if self._leader_pending(request):
                index += 1  # a sibling waits for its leader's prompt; others may go ahead
                continue
            if self._grammar_pending(request):
                index += 1  # its grammar compiles; others may go ahead
                continue
            if request.is_finished:
                continue  # its grammar failed: it left the queue
            # A prompt still to be scored is computed, not found in the cache.
            computed_blocks = [] if request.needs_prompt_logprobs else self.kv_cache.get_computed_blocks(request)
            num_cached = len(computed_blocks) * self.kv_cache.block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv_cache.allocate_slots(request, num_new, computed_blocks):
                break  # first come, first served: nobody overtakes a request that does not fit
            del self.waiting[index]
            self.kv_cache.record_prefix_lookup(request.num_tokens, num_cached)
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add_to_output(output, request, num_new)
            budget -= num_new

    def _add_to_output(self, output: SchedulerOutput, request: Request, num_new: int, num_drafts: int = 0) -> None:
        """Records the request's share of the step, whole if the runner does not hold it, else as a diff.

        ``num_new`` counts the request's ``num_drafts`` draft tokens, which come after its known ones."""
        request_id = request.request_id
        block_table = self.kv_cache.get_block_table(request_id)
        if request.num_tokens_in_runner is None:
            # Copies: a message must not change after it is sent (the request's lists keep growing).
            output.new_requests.append(NewRequestData(
                request_id, request.prompt_token_ids, list(request.output_token_ids), request.params,
                list(block_table), request.num_computed_tokens, request.seed))
        else:
            output.cached_requests.append(CachedRequestData(
                request_id, request.all_token_ids[request.num_tokens_in_runner:],
                block_table[request.num_blocks_in_runner:], request.num_computed_tokens))
        request.num_tokens_in_runner = request.num_tokens
        request.num_blocks_in_runner = len(block_table)
        request.known_to_runner = True
        output.num_scheduled_tokens[request_id] = num_new
        if request.num_computed_tokens + num_new - num_drafts == request.num_tokens:
            output.sampling_request_ids.append(request_id)

    def _leader_pending(self, request: Request) -> bool:
        leader_id = request.prefill_leader_id
        if leader_id is None:
            return False
        leader = self.requests.get(leader_id)
        if leader is None or leader.num_computed_tokens >= leader.num_prompt_tokens:
            request.prefill_leader_id = None
            return False
        return True

    # -- after the forward pass ---------------------------------------------------

    def update_from_output(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput,
                           now: float = 0.0) -> list[EngineCoreOutput]:
        """Advances computed counts, accepts sampled tokens, finishes requests; returns what is new per request."""
        rows = {request_id: row for row, request_id in enumerate(runner_output.request_ids)}
        for request_id, num_new in scheduler_output.num_scheduled_tokens.items():
            request = self.requests.get(request_id)
            if request is None:
                continue  # aborted while the step ran
            num_drafts = scheduler_output.num_drafts(request_id)
            if num_drafts:
                # The accepted drafts' KV stays (they become tokens below); the rejected ones' is never counted
                # as computed, so it is written over and never hashed into the prefix cache.
                row = rows.get(request_id)
                num_accepted = len(runner_output.sampled_token_ids[row]) - 1 if row is not None else 0
                num_new -= num_drafts - num_accepted
                self.speculator.record(request, num_drafts, num_accepted)
            request.num_computed_tokens += num_new
            self.kv_cache.cache_computed_blocks(request)
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
        for request_id, (start, scored) in runner_output.prompt_logprobs.items():
            request = self.requests.get(request_id)
            if request is not None and request.needs_prompt_logprobs:
                # Entries for tokens scored before (a preempted prompt computed again) are dropped.
                request.prompt_logprobs.extend(scored[1 + len(request.prompt_logprobs) - start:])
        outputs = []
        for row, request_id in enumerate(runner_output.request_ids):
            request = self.requests.get(request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue
            outputs.append(self._accept_tokens(request, runner_output.sampled_token_ids[row],
                                               runner_output.logprobs[row] if runner_output.logprobs else None))
        return outputs

    def _accept_tokens(self, request: Request, token_ids: list[int], logprobs) -> EngineCoreOutput:
        """Appends tokens up to the first that ends the request (EOS, a stop token, the length limit)."""
        accepted = 0
        status = None
        for token_id in token_ids:
            request.append_output_token(token_id)
            accepted += 1
            status = self._stop_status(request, token_id)
            if request.matcher is not None:
                status = self._advance_grammar(request, token_id) or status
            if status is not None:
                break
        first_output = request.num_output_tokens == accepted
        output = EngineCoreOutput(
            request.request_id, token_ids[:accepted], None if logprobs is None else logprobs[:accepted],
            num_cached_tokens=max(request.num_cached_tokens, 0),
            first_scheduled_time=request.first_scheduled_time if first_output else None,
            prompt_logprobs=request.prompt_logprobs if first_output and request.wants_prompt_logprobs else None)
        if status is not None:
            output.finish_reason, output.stop_reason = status.value, request.stop_reason
            self.finish_requests([request.request_id], status)
        return output

    @staticmethod
    def _advance_grammar(request: Request, token_id: int) -> Optional[RequestStatus]:
        """Feeds the accepted token to the request's matcher; aborts the request if the token broke it (the
        mask allows only tokens that keep it, so that is a bug). A complete grammar allows only EOS next:
        the request then ends as any other, on EOS (the token that ends it is not text)."""
        if request.matcher.consume_token(token_id):
            return None
        logger.error("request %s: token %d does not fit its grammar: %s", request.request_id, token_id,
                     request.matcher.get_error())
        return RequestStatus.FINISHED_ABORTED

    def _stop_status(self, request: Request, token_id: int) -> Optional[RequestStatus]:
        """Checked after ``token_id`` was appended. EOS and stop tokens count once min_tokens are out."""
        params = request.params
        if request.num_output_tokens >= params.min_tokens:
            if token_id in self.eos_token_ids and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if (request.num_output_tokens >= request.max_tokens
                or (self.max_model_len is not None and request.num_tokens >= self.max_model_len)):
            return RequestStatus.FINISHED_LENGTH
        return None
