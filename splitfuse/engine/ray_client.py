"""RayClient: an engine core as a Ray actor, on a local Ray or an existing cluster (``--distributed-backend ray``).

The same ``EngineCoreClient`` contract as ``MPClient``, over Ray's actor calls instead of
ZeroMQ: the actor holds an ``EngineCore`` and runs one step per ``step`` call (Ray runs an
actor's calls in the order they were made, so an add made before a step is in it). For
replicas (``engine/replica_client.py``) a step is started as soon as the actor has work and
collected when it is done (``take_output``), so replicas on different machines step at once.
"""

from __future__ import annotations

import os
import threading
from typing import Iterable, Optional

from splitfuse.config import EngineConfig
from splitfuse.engine.core import EngineCore
from splitfuse.engine.core_client import EngineCoreDeadError, EngineCoreStepError, refusal_error
from splitfuse.engine.protocol import EngineCoreError, EngineCoreOutputs, EngineCoreRequest, SchedulerStats


class EngineCoreActor:
    """Runs inside the Ray worker process; every method is one actor call."""

    def __init__(self, config: EngineConfig, num_threads: Optional[int]) -> None:
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.core = EngineCore.from_config(config)

    def add_request_groups(self, groups: list[list[EngineCoreRequest]]) -> list[Optional[EngineCoreError]]:
        """Per group, None (queued) or why it was refused."""
        return [self.core.add_or_refuse(group) for group in groups]

    def abort_requests(self, request_ids: list[str]) -> None:
        self.core.abort_requests(request_ids)

    def step(self) -> EngineCoreOutputs | EngineCoreError:
        return self.core.step_or_abort()

    def stats(self) -> SchedulerStats:
        return self.core.stats()


_RAY_INIT_LOCK = threading.Lock()  # the replicas' clients start on threads of their own, at once


def ensure_ray(address: Optional[str]) -> None:
    """Connects to the cluster at ``address``, or starts a local one (no dashboard) when there is none yet."""
    import ray

    with _RAY_INIT_LOCK:
        if ray.is_initialized():
            return
        ray.init(address=address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
                 num_cpus=None if address else len(os.sched_getaffinity(0)))


class RayClient:
    def __init__(self, config: EngineConfig, cpu_ids: Optional[list[int]] = None) -> None:
        """``cpu_ids``: only their number matters here — the CPUs Ray reserves for the actor and its threads."""
        import ray

        ensure_ray(config.parallel.ray_address)
        num_cpus = len(cpu_ids) if cpu_ids else (config.parallel.threads_per_replica or 1)
        self._ray = ray
        self._actor = ray.remote(num_cpus=num_cpus)(EngineCoreActor).remote(config, num_cpus)
        try:
            self._stats: SchedulerStats = ray.get(self._actor.stats.remote())  # waits for the model to load
        except ray.exceptions.RayActorError as error:
            raise RuntimeError(f"the engine core actor failed to start: {_cause(error)}") from None
        self._live: set[str] = set()
        self.pending_step = None  # the ObjectRef of a step started and not yet collected

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        (error,) = self.add_request_groups([requests])
        if error is not None:
            raise error

    def add_request_groups(self, groups: list[list[EngineCoreRequest]]) -> list[Optional[Exception]]:
        answers = self._get(self._actor.add_request_groups.remote(groups))
        results: list[Optional[Exception]] = []
        for group, refusal in zip(groups, answers):
            if refusal is None:
                self._live.update(r.request_id for r in group)
            results.append(None if refusal is None else refusal_error(refusal))
        return results

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        request_ids = list(request_ids)
        if request_ids:
            self._live.difference_update(request_ids)
            self._actor.abort_requests.remote(request_ids)

    def get_output(self) -> EngineCoreOutputs:
        """The next step's outputs (a step already started first); waits for it."""
        reference = self.pending_step or self._actor.step.remote()
        self.pending_step = None
        return self._collect(self._get(reference))

    def take_output(self) -> Optional[EngineCoreOutputs]:
        """A finished step's outputs, else None; starts a step when the actor has work and none runs."""
        if self.pending_step is None:
            if not self._live:
                return None
            self.pending_step = self._actor.step.remote()
        ready, _ = self._ray.wait([self.pending_step], timeout=0)
        if not ready:
            return None
        reference, self.pending_step = self.pending_step, None
        return self._collect(self._get(reference))

    def _collect(self, result: EngineCoreOutputs | EngineCoreError) -> EngineCoreOutputs:
        if isinstance(result, EngineCoreError):
            self._live.difference_update(result.request_ids)
            raise EngineCoreStepError(result.message, result.request_ids)
        for output in result.outputs:
            if output.finish_reason is not None:
                self._live.discard(output.request_id)
        if result.scheduler_stats is not None:
            self._stats = result.scheduler_stats
        return result

    def _get(self, reference):
        try:
            return self._ray.get(reference)
        except self._ray.exceptions.RayActorError as error:
            raise EngineCoreDeadError(f"the engine core actor died: {_cause(error)}") from None

    def stats(self) -> SchedulerStats:
        return self._stats

    def shutdown(self) -> None:
        if self._actor is not None:
            self._ray.kill(self._actor)
            self._actor = None


def wait_for_any_step(clients: list[RayClient], timeout_ms: Optional[int]) -> None:
    """Returns once one of these clients' started steps is done (or after ``timeout_ms``)."""
    import ray

    pending = [client.pending_step for client in clients if client.pending_step is not None]
    if pending:
        ray.wait(pending, num_returns=1, timeout=None if timeout_ms is None else timeout_ms / 1000)


def _cause(error: Exception) -> str:
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
