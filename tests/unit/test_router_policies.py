"""Routing policies and prefix indexes as specifications: the exact replica and reason for given loads and caches."""

import pytest

from splitfuse.engine.kv_cache.hashing import hash_block
from splitfuse.engine.protocol import BlockRemoved, BlockStored
from splitfuse.router.policies import (REASONS, CacheAwarePolicy, LeastLoadPolicy, LoadScore, RoundRobinPolicy,
                                       SessionPolicy, make_policy, rendezvous_weight)
from splitfuse.router.prefix_index import ApproximateTree, PreciseBlockIndex
from splitfuse.router.types import ReplicaLoad, RouteRequest

PROMPT = list(range(100, 200))  # 100 tokens


def loads(*waiting_tokens: int, **fields) -> list[ReplicaLoad]:
    """Replicas a, b, c, ... whose scores are exactly their waiting tokens (no requests, empty KV)."""
    return [ReplicaLoad(chr(ord("a") + index), waiting_tokens=tokens, **fields)
            for index, tokens in enumerate(waiting_tokens)]


def decide(policy, request: RouteRequest, replicas: list[ReplicaLoad]) -> tuple[str, str]:
    decision = policy.choose(request, replicas)
    return decision.replica_id, decision.reason


def route_flood(policy, requests: list[RouteRequest], replicas: list[ReplicaLoad]) -> list[tuple[str, str]]:
    """Routes one request after another as the router does: learn, and count it in flight at once."""
    by_id = {replica.replica_id: replica for replica in replicas}
    decisions = []
    for request in requests:
        replica_id, reason = decide(policy, request, replicas)
        policy.on_routed(request, replica_id)
        by_id[replica_id].in_flight += 1
        decisions.append((replica_id, reason))
    return decisions


def chained_hashes(token_ids: list[int], block_size: int) -> list[bytes]:
    hashes: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        hashes.append(hash_block(hashes[-1] if hashes else None, token_ids[start:start + block_size]))
    return hashes


# --- load score and least-load -------------------------------------------------------------------


def test_load_score_worked_example_from_its_docstring():
    a = ReplicaLoad("a", num_waiting=2, num_running=2, waiting_tokens=0, kv_cache_usage=0.75, in_flight=3)
    b = ReplicaLoad("b", num_waiting=1, num_running=1, waiting_tokens=600, kv_cache_usage=0.25, in_flight=2)
    assert (LoadScore()(a), LoadScore()(b)) == (1280.0, 1112.0)
    assert decide(LeastLoadPolicy(), RouteRequest(), [a, b]) == ("b", "least_load")


def test_load_score_counts_in_flight_or_the_replicas_own_count_whichever_is_larger():
    assert LoadScore()(ReplicaLoad("a", num_waiting=1, num_running=1, in_flight=5)) == 640.0
    assert LoadScore()(ReplicaLoad("a", num_waiting=3, num_running=4, in_flight=5)) == 896.0
    assert LoadScore(request_tokens=10, kv_full_tokens=100)(ReplicaLoad("a", in_flight=2, kv_cache_usage=0.5)) == 70.0


def test_least_load_ties_go_to_the_first_replica_in_order():
    assert decide(LeastLoadPolicy(), RouteRequest(), loads(5, 5, 5)) == ("a", "least_load")
    assert decide(LeastLoadPolicy(), RouteRequest(), loads(7, 5, 5)) == ("b", "least_load")


# --- health, round-robin, make_policy ------------------------------------------------------------


@pytest.mark.parametrize("name", ["round-robin", "least-load", "cache-aware", "session"])
def test_no_healthy_replica_is_a_value_error(name):
    replicas = loads(0, 0, healthy=False)
    with pytest.raises(ValueError, match=r"no healthy replica among \['a', 'b'\]"):
        make_policy(name).choose(RouteRequest(token_ids=PROMPT, session_key="user-1"), replicas)


def a_session_key_ranking_a_first() -> str:
    return next(key for key in (f"user-{index}" for index in range(100))
                if rendezvous_weight(key, "a") > max(rendezvous_weight(key, "b"), rendezvous_weight(key, "c")))


@pytest.mark.parametrize("name", ["round-robin", "least-load", "cache-aware", "session"])
def test_an_unhealthy_replica_is_never_chosen_even_where_it_would_be_the_pick(name):
    policy = make_policy(name)
    request = RouteRequest(token_ids=PROMPT, session_key=a_session_key_ranking_a_first())
    policy.on_routed(request, "a")  # a caches the whole prompt, has the lowest load and the session
    replicas = loads(0, 500, 700)
    replicas[0].healthy = False
    chosen = {policy.choose(request, replicas).replica_id for _ in range(6)}
    session_next = max("bc", key=lambda replica_id: rendezvous_weight(request.session_key, replica_id))
    assert chosen == {"round-robin": {"b", "c"}, "session": {session_next}}.get(name, {"b"})


def test_round_robin_takes_the_healthy_replicas_in_turn():
    replicas = loads(0, 0, 0)
    replicas[1].healthy = False
    policy = RoundRobinPolicy()
    assert [decide(policy, RouteRequest(), replicas) for _ in range(4)] == [
        ("a", "round_robin"), ("c", "round_robin"), ("a", "round_robin"), ("c", "round_robin")]


def test_make_policy_builds_each_routing_name_and_gives_block_size_to_cache_aware_only():
    assert type(make_policy("round-robin", block_size=16)) is RoundRobinPolicy
    assert type(make_policy("least-load", block_size=16)) is LeastLoadPolicy
    assert type(make_policy("session", block_size=16)) is SessionPolicy
    cache_aware = make_policy("cache-aware", block_size=16, abs_threshold=10.0)
    assert (cache_aware.index.block_size, cache_aware.abs_threshold) == (16, 10.0)
    assert make_policy("cache-aware").index is None
    with pytest.raises(ValueError, match=r"unknown routing policy 'random'; choose one of \['cache-aware', "
                                         r"'least-load', 'round-robin', 'session'\]"):
        make_policy("random")


def test_every_reason_a_policy_gives_is_listed():
    assert REASONS == ("round_robin", "least_load", "imbalance", "cache_hit", "cache_hit_overloaded", "cache_miss",
                       "session", "session_failover", "no_session_key")


# --- cache-aware: thresholds ---------------------------------------------------------------------


def policy_with_prompt_on_b(matched_tokens: int = 100, **options) -> CacheAwarePolicy:
    """Cache-aware (abs 1024, rel 1.5) whose approximate tree has the first matched_tokens of PROMPT on b."""
    policy = CacheAwarePolicy(**options)
    policy.on_routed(RouteRequest(token_ids=PROMPT[:matched_tokens]), "b")
    return policy


@pytest.mark.parametrize("score_b, expected", [
    (1023, ("b", "cache_hit")),  # spread just under abs_threshold (and b > 1.5 x 0)
    (1024, ("b", "cache_hit")),  # at abs_threshold: not imbalanced
    (1025, ("a", "imbalance")),  # over it
])
def test_imbalance_at_the_absolute_threshold(score_b, expected):
    assert decide(policy_with_prompt_on_b(), RouteRequest(token_ids=PROMPT), loads(0, score_b)) == expected


@pytest.mark.parametrize("score_b, expected", [
    (5999, ("b", "cache_hit")),  # spread 1999 > abs, but b under 1.5 x a
    (6000, ("b", "cache_hit")),  # b at 1.5 x a: not imbalanced; 2000 extra <= 1024 + 1000 saved
    (6001, ("a", "imbalance")),  # over 1.5 x a
])
def test_imbalance_at_the_relative_threshold(score_b, expected):
    policy = CacheAwarePolicy()
    long_prompt = list(range(1000))
    policy.on_routed(RouteRequest(token_ids=long_prompt), "b")
    assert decide(policy, RouteRequest(token_ids=long_prompt), loads(4000, score_b)) == expected


@pytest.mark.parametrize("a_holds, score_b, expected", [
    (0, 12024, ("b", "cache_hit")),  # 2024 extra = 1024 + 1000 saved: still worth it
    (0, 12025, ("a", "cache_hit_overloaded")),
    (400, 11624, ("b", "cache_hit")),  # a holds 400 of the 1000, so b saves only 600 more
    (400, 11625, ("a", "cache_hit_overloaded")),
])
def test_a_cache_hit_on_a_replica_busier_than_the_prefill_it_saves_goes_to_least_load(a_holds, score_b, expected):
    policy = CacheAwarePolicy()
    long_prompt = list(range(1000))
    policy.on_routed(RouteRequest(token_ids=long_prompt), "b")
    if a_holds:
        policy.on_routed(RouteRequest(token_ids=long_prompt[:a_holds]), "a")
    assert decide(policy, RouteRequest(token_ids=long_prompt), loads(10000, score_b)) == expected


@pytest.mark.parametrize("matched_tokens, expected", [
    (49, ("a", "cache_miss")),  # under half the prompt
    (50, ("b", "cache_hit")),  # exactly min_match_ratio 0.5
])
def test_a_hit_needs_min_match_ratio_of_the_prompt(matched_tokens, expected):
    policy = policy_with_prompt_on_b(matched_tokens)
    assert decide(policy, RouteRequest(token_ids=PROMPT), loads(0, 0)) == expected


@pytest.mark.parametrize("matched_tokens, expected", [(15, ("a", "cache_miss")), (16, ("b", "cache_hit"))])
def test_a_hit_needs_min_match_tokens(matched_tokens, expected):
    policy = policy_with_prompt_on_b(matched_tokens)
    assert decide(policy, RouteRequest(token_ids=PROMPT[:20]), loads(0, 0)) == expected


def test_equal_matches_go_to_the_less_loaded_then_the_first():
    policy = CacheAwarePolicy()
    for replica_id in ("a", "b", "c"):
        policy.on_routed(RouteRequest(token_ids=PROMPT), replica_id)
    assert decide(policy, RouteRequest(token_ids=PROMPT), loads(300, 200, 200)) == ("b", "cache_hit")
    assert decide(policy, RouteRequest(token_ids=PROMPT), loads(200, 200, 200)) == ("a", "cache_hit")


def test_a_request_with_nothing_to_match_is_a_miss():
    assert decide(CacheAwarePolicy(), RouteRequest(session_key="x"), loads(5, 3)) == ("b", "cache_miss")


def test_a_flood_of_misses_spreads_by_load_not_onto_the_replica_that_caches_least():
    # SGLang's death spiral: c was just restarted (empty tree) but has a queue; a miss must not pile onto it.
    policy = CacheAwarePolicy()
    for replica_id, first_token in (("a", 50_000), ("b", 60_000)):
        policy.on_routed(RouteRequest(token_ids=list(range(first_token, first_token + 500))), replica_id)
    replicas = loads(0, 0, 900)
    misses = [RouteRequest(token_ids=[1000 * index + offset for offset in range(32)]) for index in range(17)]
    # a and b take turns until both are at 8 x 128 = 1024: their 8th came at 896, still under c's 900.
    assert route_flood(policy, misses, replicas) == [("a", "cache_miss"), ("b", "cache_miss")] * 8 + [
        ("c", "cache_miss")]


def test_multi_turn_chat_follows_its_whole_history_and_a_template_alone_is_no_hit():
    policy = CacheAwarePolicy()
    template = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    turn_1 = template + "Summarise the plot of Hamlet in three sentences.<|im_end|>\n<|im_start|>assistant\n"
    turn_2 = turn_1 + "Prince Hamlet avenges his father.<|im_end|>\n<|im_start|>user\nAnd Macbeth?<|im_end|>\n"
    other_user = template + "Write a limerick about a cat who learns to play the violin very badly.<|im_end|>\n"
    replicas = loads(0, 0)
    assert route_flood(policy, [RouteRequest(text=turn_1)], replicas) == [("a", "cache_miss")]
    # a is now busier by one request (128), yet the second turn's history is cached there.
    assert decide(policy, RouteRequest(text=turn_2), replicas) == ("a", "cache_hit")
    assert decide(policy, RouteRequest(text=other_user), replicas) == ("b", "cache_miss")


# --- cache-aware: the precise index --------------------------------------------------------------


def test_cache_aware_uses_kv_events_once_they_arrive_and_learns_no_tree_from_then_on():
    policy = CacheAwarePolicy(block_size=4)
    prompt = list(range(20))
    hashes = chained_hashes(prompt, 4)
    policy.on_routed(RouteRequest(token_ids=prompt), "a")  # no events yet: the tree learns
    assert decide(policy, RouteRequest(token_ids=prompt), loads(0, 0)) == ("a", "cache_hit")
    policy.on_kv_events("b", [BlockStored(hashes[:3], [7, 8, 9], None)])  # now the index is trusted
    assert decide(policy, RouteRequest(token_ids=prompt), loads(0, 0)) == ("b", "cache_hit")  # 12 of 20
    entries_before = policy.tree.num_entries
    policy.on_routed(RouteRequest(token_ids=list(range(50, 70))), "b")
    assert policy.tree.num_entries == entries_before
    policy.on_kv_events("b", [BlockRemoved([hashes[1]])])  # 4 of 20 is under half
    assert decide(policy, RouteRequest(token_ids=prompt), loads(0, 0)) == ("a", "cache_miss")
    policy.on_kv_events("b", [BlockStored([hashes[1]], [8], hashes[0])])
    assert decide(policy, RouteRequest(token_ids=prompt), loads(0, 0)) == ("b", "cache_hit")
    policy.forget_replica("b")
    assert decide(policy, RouteRequest(token_ids=prompt), loads(0, 0)) == ("a", "cache_miss")


def test_precise_index_counts_the_leading_blocks_each_replica_holds():
    index = PreciseBlockIndex(block_size=4)
    prompt = list(range(14))  # 3 full blocks and 2 tokens that never count
    h0, h1, h2 = chained_hashes(prompt, 4)
    index.on_kv_events("a", [BlockStored([h0, h1], [5, 6], None)])
    index.on_kv_events("b", [BlockStored([h0], [0], None), BlockStored([h1, h2], [1, 2], h0)])
    index.on_kv_events("c", [BlockStored([h1, h2], [3, 4], h0)])  # c lost h0: its later blocks are unreachable
    assert index.matched_blocks(prompt) == {"a": 2, "b": 3}
    assert index.matched_blocks(prompt[:7]) == {"a": 1, "b": 1}
    assert index.matched_blocks([0, 1, 2, 99] + prompt[4:]) == {}  # chaining: a different first block
    index.on_kv_events("b", [BlockRemoved([h1])])
    assert index.matched_blocks(prompt) == {"a": 2, "b": 1}
    index.forget_replica("a")
    assert index.matched_blocks(prompt) == {"b": 1}
    assert index.num_events_seen == 5


def test_precise_index_keeps_a_hash_until_every_copy_is_removed_and_ignores_unknown_removals():
    index = PreciseBlockIndex(block_size=2)
    (h0,) = chained_hashes([7, 8], 2)
    index.on_kv_events("a", [BlockRemoved([h0])])  # stored before the router listened
    index.on_kv_events("a", [BlockStored([h0], [1], None), BlockStored([h0], [2], None), BlockRemoved([h0])])
    assert index.matched_blocks([7, 8]) == {"a": 1}
    index.on_kv_events("a", [BlockRemoved([h0])])
    assert index.matched_blocks([7, 8]) == {}
    with pytest.raises(TypeError, match="unknown KV event str from replica 'a'"):
        index.on_kv_events("a", ["cleared"])


# --- the approximate tree ------------------------------------------------------------------------


def test_tree_matches_the_longest_prefix_each_replica_was_sent():
    tree = ApproximateTree()
    tree.insert([1, 2, 3, 4, 5], "a")
    tree.insert([1, 2, 3, 9], "b")
    assert tree.match([1, 2, 3, 4, 5, 6]) == {"a": 5, "b": 3}
    assert tree.match([1, 2, 7]) == {"a": 2, "b": 2}
    assert tree.match([1, 2, 3, 9]) == {"a": 3, "b": 4}
    assert tree.match([8]) == {}
    assert tree.match((1, 2, 3)) == {"a": 3, "b": 3}
    assert tree.num_entries == 9  # a: 5 tokens; b: 3 shared + 1


def test_tree_keeps_text_and_token_keys_apart():
    tree = ApproximateTree()
    tree.insert([97, 98], "a")
    tree.insert("ab", "b")
    assert (tree.match("abc"), tree.match([97, 98, 99])) == ({"b": 2}, {"a": 2})


def test_tree_evicts_the_least_recently_routed_leaves_first():
    tree = ApproximateTree(max_entries=8)
    tree.insert("abcd", "a")  # tick 1
    tree.insert("wxyz", "b")  # tick 2
    tree.insert("abef", "a")  # tick 3: 10 entries; a's leaf "cd" (tick 1) goes
    assert (tree.num_entries, tree.match("abcd"), tree.match("abef"), tree.match("wxyz")) == (
        8, {"a": 2}, {"a": 4}, {"b": 4})
    tree.insert("wxyq", "b")  # tick 4: 9 entries; b's leaf "z" keeps tick 2 although "wxy" was refreshed
    assert (tree.num_entries, tree.match("wxyz"), tree.match("wxyq")) == (8, {"b": 3}, {"b": 4})
    tree.insert("mn", "c")  # tick 5: a's "ef" goes before its parent "ab" (same tick, deeper first)
    assert (tree.num_entries, tree.match("abef")) == (8, {"a": 2})
    tree.insert("mnop", "c")  # then "ab" itself, now a leaf
    assert (tree.num_entries, tree.match("abef"), tree.match("mnop")) == (8, {}, {"c": 4})


def test_tree_keeps_the_head_of_a_key_longer_than_max_entries():
    tree = ApproximateTree(max_entries=8)
    tree.insert("abcdefghij", "a")
    assert (tree.num_entries, tree.match("abcdefghij")) == (8, {"a": 8})


def test_tree_forgets_a_replica_and_keeps_what_others_share():
    tree = ApproximateTree()
    tree.insert("hello world", "a")
    tree.insert("hello there", "b")
    tree.forget_replica("a")
    assert (tree.match("hello world"), tree.num_entries) == ({"b": 6}, 11)
    tree.forget_replica("b")
    assert (tree.match("hello there"), tree.num_entries) == ({}, 0)


def test_tree_under_churn_stays_within_max_entries_and_always_holds_the_last_route():
    tree = ApproximateTree(max_entries=64)
    for index in range(3000):
        key = [index % 7, (index * 3) % 11, index % 5] + list(range(index % 13))
        replica_id = "abc"[index % 3]
        tree.insert(key, replica_id)
        assert tree.num_entries <= 64
        assert tree.match(key)[replica_id] == len(key)
    assert len(tree._heap) <= 2 * tree._num_pairs + 1024  # stale heap entries are compacted away


def test_tree_routing_one_prompt_again_and_again_does_not_grow_and_still_evicts_in_order():
    tree = ApproximateTree(max_entries=30)
    for index in range(3000):
        tree.insert("hello world", "ab"[index % 2])  # a last at tick 2999, b at 3000
    assert (tree.num_entries, len(tree._heap) <= 2 * 2 + 1024) == (22, True)
    tree.insert("goodbye", "c")
    tree.insert("xy", "c")  # 31 entries: a's copy of "hello world" is the least recently routed
    assert (tree.num_entries, tree.match("hello world"), tree.match("goodbye")) == (20, {"b": 11}, {"c": 7})


# --- session affinity ----------------------------------------------------------------------------


def session_map(keys: list[str], replica_ids: list[str]) -> dict[str, str]:
    policy, replicas = SessionPolicy(), [ReplicaLoad(replica_id) for replica_id in replica_ids]
    return {key: policy.choose(RouteRequest(session_key=key), replicas).replica_id for key in keys}


KEYS = [f"user-{index}" for index in range(200)]


def test_a_session_sticks_to_its_replica_whatever_the_loads():
    policy = SessionPolicy()
    first = decide(policy, RouteRequest(session_key="user-0"), loads(0, 0, 0))
    assert first == ("a", "session")
    assert decide(policy, RouteRequest(session_key="user-0"), loads(9000, 0, 0)) == first


def test_rendezvous_hashing_moves_only_the_removed_replicas_sessions():
    before = session_map(KEYS, ["r0", "r1", "r2"])
    assert session_map(KEYS, ["r2", "r0", "r1"]) == before  # the replicas' order does not matter
    assert [list(before.values()).count(replica_id) for replica_id in ("r0", "r1", "r2")] == [81, 73, 46]
    after = session_map(KEYS, ["r0", "r2"])
    moved = {key for key in KEYS if after[key] != before[key]}
    assert moved == {key for key in KEYS if before[key] == "r1"}
    assert len(moved) == 73


def test_an_unhealthy_sessions_replica_fails_over_to_where_it_would_go_without_it():
    policy = SessionPolicy()
    replicas = [ReplicaLoad("r0"), ReplicaLoad("r1", healthy=False), ReplicaLoad("r2")]
    without_r1 = session_map(KEYS, ["r0", "r2"])
    before = session_map(KEYS, ["r0", "r1", "r2"])
    for key in KEYS:
        expected_reason = "session_failover" if before[key] == "r1" else "session"
        assert decide(policy, RouteRequest(session_key=key), replicas) == (without_r1[key], expected_reason)


def test_a_request_without_a_session_key_goes_to_least_load():
    assert decide(SessionPolicy(), RouteRequest(token_ids=PROMPT), loads(5, 3, 4)) == ("b", "no_session_key")
