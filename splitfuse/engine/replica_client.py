"""ReplicatedClient: several engine cores, each in its own pinned process or Ray actor, behind one frontend; a policy routes each request.

It is an ``EngineCoreClient`` like the others, so ``LLMEngine`` and the server above it are
unchanged (``--replicas N``): each request's sequences go to the replica the routing policy
(``router/policies.py``) picks from the replicas' live numbers — their latest ``SchedulerStats``,
the requests in flight there, and (cache-aware) the prefix blocks their KV events say they hold.
Outputs of all replicas are merged, step by step, as they arrive. The replicas are ``MPClient``s
(processes on this machine) or, with ``--distributed-backend ray``, ``RayClient``s (actors anywhere
on a Ray cluster); only how the client waits for them differs.

Failover: when a replica's process dies, each sequence it ran is sent to another replica as its
prompt plus the tokens generated so far (``max_tokens`` and ``min_tokens`` reduced by those), so
its caller's stream goes on; a greedy sequence continues with the same tokens wherever the
numerics are batch invariant (bf16 on the CPU kernels), a sampled one from a fresh draw. A
sequence that no replica takes ends with ``finish_reason="abort"``. The dead replica is started
again in the background and rejoins when it is ready.
"""

from __future__ import annotations

import collections
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Optional

import zmq

from splitfuse.config import EngineConfig
from splitfuse.engine.core_client import EngineCoreDeadError, MPClient
from splitfuse.engine.protocol import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest, SchedulerStats
from splitfuse.router.policies import make_policy
from splitfuse.router.types import ReplicaLoad, RouteRequest, RoutingPolicy


logger = logging.getLogger(__name__)

# While a dead replica restarts, waits for outputs wake this often to see whether it is back.
_RESTART_POLL_MS = 200


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
        self.config = config
        self.replica_ids = [f"replica-{i}" for i in range(parallel.replicas)]
        self.policy = policy or make_policy(parallel.routing, block_size=config.cache.block_size)
        self._cpu_sets = cpu_sets = replica_cpu_sets(parallel.replicas, parallel.threads_per_replica)
        self._on_ray = parallel.distributed_backend == "ray"
        if self._on_ray:
            from splitfuse.engine.ray_client import RayClient

            self._replica_class = RayClient
        else:
            self._replica_class = MPClient
        # The replicas load their models at the same time; each constructor waits for its own.
        with ThreadPoolExecutor(max_workers=parallel.replicas) as pool:
            futures = [pool.submit(self._replica_class, config, cpu_ids=cpu_ids) for cpu_ids in cpu_sets]
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
        self.replicas: list = clients  # MPClient or RayClient, all of one kind
        self.healthy = [True] * len(clients)
        self._owner: dict[str, int] = {}  # sequence id -> the replica that runs it
        self._in_flight = [0] * len(clients)
        # What a sequence would need to resume elsewhere: its request and the tokens it has so far.
        self._requests: dict[str, EngineCoreRequest] = {}
        self._generated: dict[str, list[int]] = {}
        self._orphans: list[EngineCoreOutput] = []  # sequences no replica took after a failure
        self._restarts: dict[int, Future] = {}
        self._restarter = ThreadPoolExecutor(max_workers=len(clients), thread_name_prefix="splitfuse-replica")
        self._poller = zmq.Poller()  # MPClient replicas: their sockets and process sentinels
        for client in clients:
            self._watch(client)
        self.decisions: collections.Counter[str] = collections.Counter()  # routing reason -> requests
        self.num_failovers = 0  # sequences resumed on another replica

    # -- requests -------------------------------------------------------------------------

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        (error,) = self.add_request_groups([requests])
        if error is not None:
            raise error

    def add_request_groups(self, groups: list[list[EngineCoreRequest]]) -> list[Optional[Exception]]:
        """Routes each group to a replica; a replica found dead on the way fails over and its groups go again."""
        self._swap_in_restarted()
        results: list[Optional[Exception]] = [None] * len(groups)
        pending = list(range(len(groups)))
        while pending:
            if not any(self.healthy):
                for g in pending:
                    results[g] = EngineCoreDeadError("no engine replica is running")
                return results
            loads = self._loads()
            chosen: dict[int, list[int]] = collections.defaultdict(list)
            for g in pending:
                decision = self.policy.choose(RouteRequest(token_ids=groups[g][0].prompt_token_ids,
                                                           session_key=groups[g][0].tenant), loads)
                index = self.replica_ids.index(decision.replica_id)
                loads[index].in_flight += 1  # the next group of this batch sees it
                loads[index].waiting_tokens += len(groups[g][0].prompt_token_ids)
                self.decisions[decision.reason] += 1
                chosen[index].append(g)
            pending = []
            for index, mine in chosen.items():
                try:
                    errors = self.replicas[index].add_request_groups([groups[g] for g in mine])
                except EngineCoreDeadError:
                    self._fail_replica(index)
                    pending.extend(mine)  # not started anywhere: route them again
                    continue
                for g, error in zip(mine, errors):
                    results[g] = error
                    if error is None:
                        self._admit(index, groups[g])
        return results

    def _admit(self, index: int, group: list[EngineCoreRequest]) -> None:
        for request in group:
            self._owner[request.request_id] = index
            self._requests.setdefault(request.request_id, request)
            self._generated.setdefault(request.request_id, [])
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
        self._requests.pop(request_id, None)
        self._generated.pop(request_id, None)
        if index is not None:
            self._in_flight[index] -= 1
        return index

    # -- outputs ----------------------------------------------------------------------------

    def get_output(self) -> EngineCoreOutputs:
        """The outputs of every replica that has stepped since the last call (waits for at least one)."""
        while True:
            self._swap_in_restarted()
            merged = self._take_ready()
            if merged is not None:
                return merged
            if not any(self.healthy) and not self._restarts:
                raise EngineCoreDeadError("every engine replica has exited")
            self._wait(_RESTART_POLL_MS if self._restarts else None)

    def _wait(self, timeout_ms: Optional[int]) -> None:
        if self._on_ray:
            from splitfuse.engine.ray_client import wait_for_any_step

            wait_for_any_step([c for c, up in zip(self.replicas, self.healthy) if up], timeout_ms)
        else:
            self._poller.poll(timeout_ms)

    def _watch(self, client) -> None:
        if not self._on_ray:
            for handle in client.wait_handles():
                self._poller.register(handle, zmq.POLLIN)

    def _unwatch(self, client) -> None:
        if not self._on_ray:
            for handle in client.wait_handles():
                self._poller.unregister(handle)

    def _take_ready(self) -> Optional[EngineCoreOutputs]:
        pieces = []
        for index, client in enumerate(self.replicas):
            if not self.healthy[index]:
                continue
            try:
                while (outputs := client.take_output()) is not None:
                    self._note_outputs(index, outputs)
                    pieces.append(outputs)
            except EngineCoreDeadError:
                self._fail_replica(index)
        outputs = [o for piece in pieces for o in piece.outputs] + self._orphans
        self._orphans = []
        if not pieces and not outputs:
            return None
        timestamp = max((p.timestamp for p in pieces), default=0.0)
        return EngineCoreOutputs(outputs, timestamp, scheduler_stats=self.stats())

    def _note_outputs(self, index: int, outputs: EngineCoreOutputs) -> None:
        self.policy.on_kv_events(self.replica_ids[index], outputs.kv_events)
        for output in outputs.outputs:
            generated = self._generated.get(output.request_id)
            if generated is not None:
                generated.extend(output.new_token_ids)
            if output.finish_reason is not None:
                self._release(output.request_id)

    # -- failover -----------------------------------------------------------------------------

    def _fail_replica(self, index: int) -> None:
        """Takes a dead replica out, resumes its sequences elsewhere, and starts it again in the background."""
        if not self.healthy[index]:
            return
        logger.error("engine replica %s exited; resuming its requests on the others", self.replica_ids[index])
        self.healthy[index] = False
        self._unwatch(self.replicas[index])
        self.replicas[index].shutdown()
        self.policy.forget_replica(self.replica_ids[index])
        orphaned = [request_id for request_id, owner in self._owner.items() if owner == index]
        resumed = [self._resumed_request(request_id) for request_id in orphaned]
        for request_id in orphaned:
            self._owner.pop(request_id)
        self._in_flight[index] = 0
        groups = [[request] for request in resumed if request is not None]
        for group, error in zip(groups, self.add_request_groups(groups)):
            if error is not None:
                logger.error("request %s could not be resumed: %s", group[0].request_id, error)
                self._release(group[0].request_id)
                self._orphans.append(EngineCoreOutput(group[0].request_id, [], finish_reason="abort"))
        self.num_failovers += len(groups)
        self._restarts[index] = self._restarter.submit(self._replica_class, self.config,
                                                       cpu_ids=self._cpu_sets[index])

    def _resumed_request(self, request_id: str) -> Optional[EngineCoreRequest]:
        """The request as it stands: prompt + tokens so far, the rest of its budgets (None: it is done)."""
        original, generated = self._requests.get(request_id), self._generated.get(request_id, [])
        if original is None or len(generated) >= original.max_tokens:
            return None
        params = original.sampling_params
        if params.min_tokens:
            params = params.clone(min_tokens=max(0, params.min_tokens - len(generated)),
                                  max_tokens=original.max_tokens - len(generated))
        resumed = EngineCoreRequest(request_id, original.prompt_token_ids + generated, params, original.arrival_time,
                                    original.max_tokens - len(generated), original.priority, original.tenant,
                                    original.seed)
        return resumed  # _admit keeps the original and the token list: a second failover counts from them

    def _swap_in_restarted(self) -> None:
        for index, future in list(self._restarts.items()):
            if not future.done():
                continue
            del self._restarts[index]
            try:
                client = future.result()
            except Exception as error:  # it stays out; the others serve
                logger.error("engine replica %s did not restart: %s", self.replica_ids[index], error)
                continue
            self.replicas[index] = client
            self.healthy[index] = True
            self._watch(client)
            logger.info("engine replica %s is back", self.replica_ids[index])

    def _loads(self) -> list[ReplicaLoad]:
        loads = []
        for index, client in enumerate(self.replicas):
            stats = client.stats()
            loads.append(ReplicaLoad(self.replica_ids[index], self.healthy[index], stats.num_waiting,
                                     stats.num_running, stats.num_waiting_tokens, stats.kv_cache_usage,
                                     self._in_flight[index]))
        return loads

    def stats(self) -> SchedulerStats:
        """The running replicas' numbers added up (KV usage: of all their blocks together)."""
        each = [client.stats() for client, up in zip(self.replicas, self.healthy) if up] or [self.replicas[0].stats()]
        total_blocks = sum(s.num_total_blocks for s in each)
        summed = {name: sum(getattr(s, name) for s in each) for name in SchedulerStats.__struct_fields__
                  if name not in ("kv_cache_usage", "replicas_up", "routing_decisions")}
        usage = sum(s.kv_cache_usage * s.num_total_blocks for s in each) / max(total_blocks, 1)
        return SchedulerStats(kv_cache_usage=usage, **summed, replicas_up=dict(zip(self.replica_ids, self.healthy)),
                              routing_decisions=dict(self.decisions))

    def shutdown(self) -> None:
        for future in self._restarts.values():
            future.add_done_callback(lambda done: done.exception() is None and done.result().shutdown())
        self._restarter.shutdown(wait=False)
        for client in self.replicas:
            client.shutdown()
