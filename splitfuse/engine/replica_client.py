"""ReplicatedClient: several engine cores, each in its own pinned process, behind one frontend; a policy routes each request.

It is an ``EngineCoreClient`` like the others, so ``LLMEngine`` and the server above it are
unchanged (``--replicas N``): each request's sequences go to the replica the routing policy
(``router/policies.py``) picks from the replicas' live numbers — their latest ``SchedulerStats``,
the requests in flight there, and (cache-aware) the prefix blocks their KV events say they hold.
Outputs of all replicas are merged, step by step, as they arrive.
"""

from __future__ import annotations

import collections
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Optional

import zmq

from splitfuse.config import EngineConfig
from splitfuse.engine.core_client import MPClient
from splitfuse.engine.protocol import EngineCoreOutputs, EngineCoreRequest, SchedulerStats
from splitfuse.router.policies import make_policy
from splitfuse.router.types import ReplicaLoad, RouteRequest, RoutingPolicy


def replica_cpu_sets(num_replicas: int, threads_per_replica: Optional[int],
                     available: Optional[list[int]] = None) -> list[list[int]]:
    """The cores each replica is pinned to: this process's cores split evenly, in order.

    4 cores, 2 replicas -> [[0, 1], [2, 3]]; 2 cores, 2 replicas of 2 threads -> [[0, 1], [0, 1]] (shared).
    """
    cores = sorted(available if available is not None else os.sched_getaffinity(0))
    per_replica = threads_per_replica or max(1, len(cores) // num_replicas)
    return [[cores[(replica * per_replica + k) % len(cores)] for k in range(per_replica)]
            for replica in range(num_replicas)]


class ReplicatedClient:
    def __init__(self, config: EngineConfig, policy: Optional[RoutingPolicy] = None) -> None:
        parallel = config.parallel
        self.replica_ids = [f"replica-{i}" for i in range(parallel.replicas)]
        self.policy = policy or make_policy(parallel.routing, block_size=config.cache.block_size)
        cpu_sets = replica_cpu_sets(parallel.replicas, parallel.threads_per_replica)
        # The children load their models at the same time; each constructor waits for its child.
        with ThreadPoolExecutor(max_workers=parallel.replicas) as pool:
            futures = [pool.submit(MPClient, config, cpu_ids=cpu_ids) for cpu_ids in cpu_sets]
            clients, errors = [], []
            for future in futures:
                try:
                    clients.append(future.result())
                except Exception as error:  # the first failure is raised, after the others are stopped
                    errors.append(error)
        if errors:
            for client in clients:
                client.shutdown()
            raise errors[0]
        self.replicas: list[MPClient] = clients
        self._owner: dict[str, int] = {}  # sequence id -> the replica that runs it
        self._in_flight = [0] * len(clients)
        self._poller = zmq.Poller()
        for client in clients:
            for handle in client.wait_handles():
                self._poller.register(handle, zmq.POLLIN)
        self.decisions: collections.Counter[str] = collections.Counter()  # routing reason -> requests

    # -- requests -------------------------------------------------------------------------

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        (error,) = self.add_request_groups([requests])
        if error is not None:
            raise error

    def add_request_groups(self, groups: list[list[EngineCoreRequest]]) -> list[Optional[Exception]]:
        loads = self._loads()
        chosen: list[int] = []
        for group in groups:
            decision = self.policy.choose(RouteRequest(token_ids=group[0].prompt_token_ids,
                                                       session_key=group[0].tenant), loads)
            index = self.replica_ids.index(decision.replica_id)
            loads[index].in_flight += 1  # the next group of this batch sees it
            loads[index].waiting_tokens += len(group[0].prompt_token_ids)
            self.decisions[decision.reason] += 1
            chosen.append(index)
        results: list[Optional[Exception]] = [None] * len(groups)
        for index, client in enumerate(self.replicas):
            mine = [g for g, replica in enumerate(chosen) if replica == index]
            if not mine:
                continue
            for g, error in zip(mine, client.add_request_groups([groups[g] for g in mine])):
                results[g] = error
                if error is None:
                    self._admit(index, groups[g])
        return results

    def _admit(self, index: int, group: list[EngineCoreRequest]) -> None:
        for request in group:
            self._owner[request.request_id] = index
        self._in_flight[index] += len(group)
        self.policy.on_routed(RouteRequest(token_ids=group[0].prompt_token_ids, session_key=group[0].tenant),
                              self.replica_ids[index])

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        by_replica: dict[int, list[str]] = collections.defaultdict(list)
        for request_id in request_ids:
            index = self._release(request_id)
            if index is not None:
                by_replica[index].append(request_id)
        for index, ids in by_replica.items():
            self.replicas[index].abort_requests(ids)

    def _release(self, request_id: str) -> Optional[int]:
        index = self._owner.pop(request_id, None)
        if index is not None:
            self._in_flight[index] -= 1
        return index

    # -- outputs ----------------------------------------------------------------------------

    def get_output(self) -> EngineCoreOutputs:
        """The outputs of every replica that has stepped since the last call (waits for at least one)."""
        while True:
            merged = self._take_ready()
            if merged is not None:
                return merged
            self._poller.poll()

    def _take_ready(self) -> Optional[EngineCoreOutputs]:
        pieces = []
        for index, client in enumerate(self.replicas):
            while (outputs := client.take_output()) is not None:
                self.policy.on_kv_events(self.replica_ids[index], outputs.kv_events)
                for output in outputs.outputs:
                    if output.finish_reason is not None:
                        self._release(output.request_id)
                pieces.append(outputs)
        if not pieces:
            return None
        return EngineCoreOutputs([o for piece in pieces for o in piece.outputs], max(p.timestamp for p in pieces),
                                 scheduler_stats=self.stats())

    def _loads(self) -> list[ReplicaLoad]:
        loads = []
        for index, client in enumerate(self.replicas):
            stats = client.stats()
            loads.append(ReplicaLoad(self.replica_ids[index], True, stats.num_waiting, stats.num_running,
                                     stats.num_waiting_tokens, stats.kv_cache_usage, self._in_flight[index]))
        return loads

    def stats(self) -> SchedulerStats:
        """The replicas' numbers added up (KV usage: of all their blocks together)."""
        each = [client.stats() for client in self.replicas]
        total_blocks = sum(s.num_total_blocks for s in each)
        summed = {name: sum(getattr(s, name) for s in each) for name in SchedulerStats.__struct_fields__
                  if name != "kv_cache_usage"}
        usage = sum(s.kv_cache_usage * s.num_total_blocks for s in each) / max(total_blocks, 1)
        return SchedulerStats(kv_cache_usage=usage, **summed)

    def shutdown(self) -> None:
        for client in self.replicas:
            client.shutdown()
