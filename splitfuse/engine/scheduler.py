"""Scheduler: each step, hands out a token budget — running requests first, then waiting ones.

One control signal (Dynamic SplitFuse / Sarathi-Serve): ``max_num_batched_tokens``.
A running request costs 1 token if it decodes, or its next prompt chunk; waiting
requests fill what is left, a long prompt split over several steps. When KV blocks
run out, the lowest-priority (then newest) unscheduled running request is preempted
by recompute: its blocks are freed and it waits again, keeping its place and its
generated tokens.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable, Optional

from splitfuse.config import SchedulerConfig
from splitfuse.engine.kv_cache import KVCacheManager
from splitfuse.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """What one step computes: requests in batch order, and how many new tokens each gets."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.running: list[Request] = []  # admission order
        self.waiting: list[Request] = []  # sorted by Request.sort_key
        self.num_preemptions = 0

    # -- queue management ---------------------------------------------------------

    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self._enqueue_waiting(request)

    def finish_requests(self, requests: Iterable[Request], status: RequestStatus) -> None:
        """Takes requests out of whichever queue holds them and frees their blocks (idempotent)."""
        for request in requests:
            if request in self.running:
                self.running.remove(request)
            elif request in self.waiting:
                self.waiting.remove(request)
            request.status = status
            self.kv_cache.free(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.waiting)

    def _enqueue_waiting(self, request: Request) -> None:
        keys = [r.sort_key for r in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, request.sort_key), request)

    # -- one step -----------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(output, budget)
        if not output.preempted:
            self._schedule_waiting(output, budget)
        return output

    def _schedule_running(self, output: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._allocate_or_preempt(request, num_new, index, output):
                break  # the request itself was preempted: nothing after it can run either
            output.requests.append(request)
            output.num_new_tokens.append(num_new)
            budget -= num_new
            index += 1
        return budget

    def _allocate_or_preempt(self, request: Request, num_new: int, index: int,
                             output: SchedulerOutput) -> bool:
        """Allocates room for ``request``, preempting unscheduled running requests as needed.

        Only requests at or after ``index`` (not yet scheduled this step) are candidates,
        so a preemption never takes back what this step already promised.
        """
        while not self.kv_cache.allocate_slots(request, num_new):
            candidates = self.running[index:]
            victim = max(candidates, key=lambda r: r.sort_key)
            self._preempt(victim)
            output.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue_waiting(request)

    def _schedule_waiting(self, output: SchedulerOutput, budget: int) -> None:
        index = 0
        while index < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[index]
            if self._leader_pending(request):
                index += 1  # a sibling waits for its leader's prompt; others may go ahead
                continue
            computed_blocks = self.kv_cache.get_computed_blocks(request)
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
            output.requests.append(request)
            output.num_new_tokens.append(num_new)
            budget -= num_new

    @staticmethod
    def _leader_pending(request: Request) -> bool:
        leader: Optional[Request] = request.prefill_leader
        if leader is None:
            return False
        if leader.is_finished or leader.num_computed_tokens >= leader.num_prompt_tokens:
            request.prefill_leader = None
            return False
        return True

    # -- after the forward pass ---------------------------------------------------

    def update_computed(self, output: SchedulerOutput) -> list[Request]:
        """Advances ``num_computed_tokens``; returns the requests that sample this step, in batch order."""
        sampling = []
        for request, num_new in zip(output.requests, output.num_new_tokens):
            request.num_computed_tokens += num_new
            self.kv_cache.cache_computed_blocks(request)
            if request.num_computed_tokens == request.num_tokens:
                sampling.append(request)
        return sampling
