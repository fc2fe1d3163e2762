"""Scheduling policies: the order waiting requests start in and which running request is preempted.

A policy is two small functions over ``Request``s, so fair-share or SLO-aware policies plug in
without touching the scheduler's budget logic:

- ``sort_key``: lower starts first; a preempted request keeps its key, so it keeps its place.
- ``victim``: of the running requests that may be preempted, the one to preempt.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from splitfuse.engine.request import Request


class SchedulingPolicy(Protocol):
    name: str

    def sort_key(self, request: Request) -> tuple: ...

    def victim(self, candidates: Sequence[Request]) -> Request: ...


class FCFSPolicy:
    """First come, first served: arrival order only; the newest running request is preempted first."""

    name = "fcfs"

    def sort_key(self, request: Request) -> tuple:
        return (request.arrival_order,)

    def victim(self, candidates: Sequence[Request]) -> Request:
        return max(candidates, key=self.sort_key)


class PriorityPolicy:
    """Lower ``priority`` value first, then arrival; preempts the lowest priority (then newest) first."""

    name = "priority"

    def sort_key(self, request: Request) -> tuple:
        return (request.priority, request.arrival_order)

    def victim(self, candidates: Sequence[Request]) -> Request:
        return max(candidates, key=self.sort_key)


POLICIES = {"fcfs": FCFSPolicy, "priority": PriorityPolicy}


def make_policy(name: str) -> SchedulingPolicy:
    if name not in POLICIES:
        raise ValueError(f"scheduling policy must be one of {', '.join(POLICIES)}, got {name!r}")
    return POLICIES[name]()
