"""Routing policies: pick a healthy replica for each request from loads and cached prefixes, and say why.

``make_policy(name)`` builds one for ``--routing round-robin|least-load|cache-aware|session``.
A policy only decides: the caller counts ``in_flight`` (bumped as soon as a request is routed, so
a burst spreads before the replicas' own stats catch up) and feeds KV events and routed requests back.

Every decision carries one of these reasons (the Prometheus label values):

- ``round_robin``: round-robin's turn.
- ``least_load``: least-load's pick.
- ``imbalance``: cache-aware saw the loads too far apart and ignored the cache.
- ``cache_hit``: cache-aware sent the request where most of its prefix is cached.
- ``cache_hit_overloaded``: the best prefix match was too much busier than the least loaded replica.
- ``cache_miss``: no replica holds enough of the prompt; least-load picked.
- ``session``: the session key's replica.
- ``session_failover``: the session key's replica is unhealthy; the next one in its order.
- ``no_session_key``: the request has no session key; least-load picked.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

from splitfuse.config import ROUTING_POLICIES
from splitfuse.router.prefix_index import ApproximateTree, PreciseBlockIndex
from splitfuse.router.types import ReplicaLoad, RouteDecision, RouteRequest, RoutingPolicy

REASONS = ("round_robin", "least_load", "imbalance", "cache_hit", "cache_hit_overloaded", "cache_miss",
           "session", "session_failover", "no_session_key")

# Text keys are characters; BPE tokenizers average about four characters per token on English, which
# puts a text match on the same token scale as the loads it is weighed against.
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class LoadScore:
    """A replica's load in token-equivalents of work ahead of a new request; lower is better.

        score = waiting_tokens + max(num_waiting + num_running, in_flight) * request_tokens
                + kv_cache_usage * kv_full_tokens

    ``in_flight`` is the router's own live count and ``num_waiting + num_running`` the replica's
    (which also sees other clients); both count the same requests, so the larger one is taken
    rather than their sum. ``waiting_tokens`` is the prefill still queued. ``request_tokens`` (128)
    is what each request costs beyond that: a batch slot and a decode still to run, about a short
    answer's length; it also makes a queue of empty prompts count. ``kv_full_tokens`` (1024, eight
    requests' worth) is what a full KV cache adds: there the replica must queue or preempt new work.

    Worked example with the defaults:
        A: waiting_tokens=0,   2 waiting + 2 running, in_flight=3, KV 75 %  ->   0 + 4*128 + 768 = 1280
        B: waiting_tokens=600, 1 waiting + 1 running, in_flight=2, KV 25 %  -> 600 + 2*128 + 256 = 1112  -> B
    """

    request_tokens: float = 128.0
    kv_full_tokens: float = 1024.0

    def __call__(self, replica: ReplicaLoad) -> float:
        num_requests = max(replica.num_waiting + replica.num_running, replica.in_flight)
        return (replica.waiting_tokens + num_requests * self.request_tokens
                + replica.kv_cache_usage * self.kv_full_tokens)


def healthy_replicas(replicas: Sequence[ReplicaLoad]) -> list[ReplicaLoad]:
    """The candidates, in the given order; raises ValueError when there are none."""
    healthy = [replica for replica in replicas if replica.healthy]
    if not healthy:
        raise ValueError(f"no healthy replica among {[replica.replica_id for replica in replicas]}")
    return healthy


class _CachelessPolicy:
    """The parts of ``RoutingPolicy`` a policy that keeps no cache state does nothing for."""

    def on_routed(self, request: RouteRequest, replica_id: str) -> None:
        pass

    def on_kv_events(self, replica_id: str, events: list) -> None:
        pass

    def forget_replica(self, replica_id: str) -> None:
        pass


class RoundRobinPolicy(_CachelessPolicy):
    """Each healthy replica in turn, in the given order; an unhealthy one is skipped, not waited for."""

    name = "round-robin"

    def __init__(self) -> None:
        self._num_decisions = 0

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaLoad]) -> RouteDecision:
        healthy = healthy_replicas(replicas)
        chosen = healthy[self._num_decisions % len(healthy)]
        self._num_decisions += 1
        return RouteDecision(chosen.replica_id, "round_robin")


class LeastLoadPolicy(_CachelessPolicy):
    """The healthy replica with the lowest ``LoadScore``; on a tie the first in the given order."""

    name = "least-load"

    def __init__(self, load: Optional[LoadScore] = None) -> None:
        self.load = load or LoadScore()

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaLoad]) -> RouteDecision:
        return RouteDecision(self.least_loaded(healthy_replicas(replicas)).replica_id, "least_load")

    def least_loaded(self, healthy: Sequence[ReplicaLoad]) -> ReplicaLoad:
        return min(healthy, key=self.load)  # min keeps the first of equal scores


class CacheAwarePolicy:
    """The replica holding the longest prefix of the prompt, unless that costs more waiting than it saves.

    With ``score`` the ``LoadScore`` of each healthy replica, in this order:

    1. ``imbalance`` -> least-load, when max(score) - min(score) > abs_threshold AND
       max(score) > rel_threshold * min(score) (SGLang's rule, on scores rather than request counts).
    2. ``cache_miss`` -> least-load, when the longest match covers less than one block (precise
       index) or ``min_match_tokens`` (approximate tree), or less than ``min_match_ratio`` of the
       prompt. A miss is never sent to the replica that caches least (SGLang's "death spiral").
    3. ``cache_hit_overloaded`` -> least-load, when the best match B is busier than the least
       loaded replica L by more than abs_threshold plus the prefill B saves over L:
       score(B) - score(L) > abs_threshold + matched_tokens(B) - matched_tokens(L).
       (A bound of rel_threshold * min + abs_threshold would never fire here: step 1 already
       keeps every score under it.) Within abs_threshold of L a hit is always taken.
    4. ``cache_hit`` -> B: the longest match; on a tie the lower score, then the given order.

    Matches come from the ``PreciseBlockIndex`` when the policy has a ``block_size``, the request
    has ``token_ids`` and KV events have arrived; otherwise from the ``ApproximateTree`` over
    ``token_ids`` (or over ``text`` when there are none), which learns in ``on_routed``. Text
    lengths are weighed as characters / ``CHARS_PER_TOKEN`` tokens; the ratio is in characters.

    Defaults: abs_threshold 1024 token-equivalents (eight requests at ``request_tokens``), so small
    queues never override the cache; rel_threshold 1.5, so a busy fleet tolerates a wide absolute
    spread; min_match_ratio 0.5, so a shared chat template or system line alone is not a hit.
    """

    name = "cache-aware"

    def __init__(self, block_size: Optional[int] = None, abs_threshold: float = 1024.0,
                 rel_threshold: float = 1.5, min_match_tokens: int = 16, min_match_ratio: float = 0.5,
                 max_tree_entries: int = 1 << 20, load: Optional[LoadScore] = None) -> None:
        self.abs_threshold = abs_threshold
        self.rel_threshold = rel_threshold
        self.min_match_tokens = min_match_tokens
        self.min_match_ratio = min_match_ratio
        self.least_load = LeastLoadPolicy(load)
        self.index = PreciseBlockIndex(block_size) if block_size is not None else None
        self.tree = ApproximateTree(max_tree_entries)

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaLoad]) -> RouteDecision:
        healthy = healthy_replicas(replicas)
        score = {replica.replica_id: self.least_load.load(replica) for replica in healthy}
        least = self.least_load.least_loaded(healthy).replica_id
        highest, lowest = max(score.values()), score[least]
        if highest - lowest > self.abs_threshold and highest > self.rel_threshold * lowest:
            return RouteDecision(least, "imbalance")
        matched_tokens, prompt_tokens, min_tokens = self._matches(request, healthy)
        best = max(healthy, key=lambda replica: (matched_tokens.get(replica.replica_id, 0),
                                                 -score[replica.replica_id])).replica_id
        best_tokens = matched_tokens.get(best, 0)
        if best_tokens < min_tokens or best_tokens < self.min_match_ratio * prompt_tokens:
            return RouteDecision(least, "cache_miss")
        prefill_saved = best_tokens - matched_tokens.get(least, 0)
        if score[best] - lowest > self.abs_threshold + prefill_saved:
            return RouteDecision(least, "cache_hit_overloaded")
        return RouteDecision(best, "cache_hit")

    def on_routed(self, request: RouteRequest, replica_id: str) -> None:
        if self._uses_index(request):
            return  # the replica's own KV events will say what it cached
        key = request.token_ids if request.token_ids is not None else request.text
        if key:
            self.tree.insert(key, replica_id)

    def on_kv_events(self, replica_id: str, events: list) -> None:
        if self.index is not None:
            self.index.on_kv_events(replica_id, events)

    def forget_replica(self, replica_id: str) -> None:
        if self.index is not None:
            self.index.forget_replica(replica_id)
        self.tree.forget_replica(replica_id)

    def _uses_index(self, request: RouteRequest) -> bool:
        return self.index is not None and request.token_ids is not None and self.index.num_events_seen > 0

    def _matches(self, request: RouteRequest,
                 healthy: Sequence[ReplicaLoad]) -> tuple[dict[str, float], float, float]:
        """(replica -> matched tokens, prompt tokens, least tokens a hit needs), text in token-equivalents."""
        healthy_ids = {replica.replica_id for replica in healthy}
        if self._uses_index(request):
            blocks = self.index.matched_blocks(request.token_ids)
            matched = {rid: count * self.index.block_size for rid, count in blocks.items() if rid in healthy_ids}
            return matched, len(request.token_ids), self.index.block_size
        if request.token_ids is not None:
            matched = self.tree.match(request.token_ids)
            return ({rid: length for rid, length in matched.items() if rid in healthy_ids},
                    len(request.token_ids), self.min_match_tokens)
        if request.text:
            matched = self.tree.match(request.text)
            return ({rid: length / CHARS_PER_TOKEN for rid, length in matched.items() if rid in healthy_ids},
                    len(request.text) / CHARS_PER_TOKEN, self.min_match_tokens)
        return {}, 0, self.min_match_tokens  # nothing to match on: a miss


class SessionPolicy(_CachelessPolicy):
    """Each session key keeps to one replica, by rendezvous (highest-random-weight) hashing.

    A key ranks all given replicas by blake2b(key, replica_id) and takes the first healthy one:
    the top one -> ``session``, a later one -> ``session_failover``. Removing a replica moves only
    the keys it ranked first, and a failover lands where the key would go without that replica.
    A request with no key goes to least-load (``no_session_key``).
    """

    name = "session"

    def __init__(self, load: Optional[LoadScore] = None) -> None:
        self.least_load = LeastLoadPolicy(load)

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaLoad]) -> RouteDecision:
        healthy = healthy_replicas(replicas)
        if request.session_key is None:
            return RouteDecision(self.least_load.least_loaded(healthy).replica_id, "no_session_key")
        ranked = sorted(replicas, key=lambda replica: rendezvous_weight(request.session_key, replica.replica_id),
                        reverse=True)
        chosen = next(replica for replica in ranked if replica.healthy)
        return RouteDecision(chosen.replica_id, "session" if chosen is ranked[0] else "session_failover")


def rendezvous_weight(session_key: str, replica_id: str) -> int:
    """A key's weight for a replica; the NUL keeps ("ab", "c") and ("a", "bc") apart."""
    digest = hashlib.blake2b(f"{session_key}\0{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


_POLICIES = {policy.name: policy for policy in (RoundRobinPolicy, LeastLoadPolicy, CacheAwarePolicy, SessionPolicy)}
# config.ROUTING_POLICIES is what the flags offer (config.py stays free of router imports); they must agree.
assert tuple(_POLICIES) == ROUTING_POLICIES, (tuple(_POLICIES), ROUTING_POLICIES)


def make_policy(name: str, block_size: Optional[int] = None, **options) -> RoutingPolicy:
    """The policy for ``--routing name``; ``options`` go to its constructor.

    ``block_size`` is the replicas' KV block size: cache-aware builds its precise index with it,
    the other policies ignore it, so a caller may pass it whichever policy was asked for.
    """
    if name not in _POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {sorted(_POLICIES)}")
    if name == CacheAwarePolicy.name:
        options["block_size"] = block_size
    return _POLICIES[name](**options)
