"""What a router decides on: each replica's load, the request's routing keys, and the decision with its reason.

Plain data shared by the routing policies (``router/policies.py``), the in-process replica
client (``--replicas N``) and the standalone HTTP router (``splitfuse router``): a policy never
talks to a replica, it is handed these numbers and returns a ``RouteDecision``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence


@dataclass
class ReplicaLoad:
    """One replica as the router sees it now (live from a core's stats, or scraped from ``/metrics``)."""

    replica_id: str
    healthy: bool = True
    num_waiting: int = 0  # requests queued in the replica
    num_running: int = 0
    waiting_tokens: int = 0  # prompt tokens its waiting requests still have to compute
    kv_cache_usage: float = 0.0  # 0..1
    in_flight: int = 0  # requests this router sent there and has not seen finish


@dataclass
class RouteRequest:
    """The keys a policy may route on; either may be missing."""

    token_ids: Optional[list[int]] = None  # the prompt's tokens, when the router tokenizes (its own replicas)
    text: Optional[str] = None  # the prompt text otherwise (a chat: the whole history, rendered)
    session_key: Optional[str] = None  # the request's ``user`` field or a session header


@dataclass(frozen=True)
class RouteDecision:
    replica_id: str
    reason: str  # e.g. round_robin, least_load, cache_hit, imbalance, session; counted in Prometheus


class RoutingPolicy(Protocol):
    name: str

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaLoad]) -> RouteDecision:
        """Picks a healthy replica (``replicas`` holds at least one); raises ValueError if none is healthy."""
        ...

    def on_routed(self, request: RouteRequest, replica_id: str) -> None:
        """The request went to ``replica_id`` (approximate prefix trees learn from it)."""
        ...

    def on_kv_events(self, replica_id: str, events: list) -> None:
        """A replica's ``BlockStored`` / ``BlockRemoved`` events (``engine/protocol.py``), for the precise index."""
        ...

    def forget_replica(self, replica_id: str) -> None:
        """The replica is gone (failed, removed): drop what is known of its cache."""
        ...
