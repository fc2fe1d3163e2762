"""BlockPool and KVCacheManager: exact block ids, reference counts, LRU eviction order, prefix hits."""

import pytest

from splitfuse.engine.kv_cache import BlockPool, KVCacheManager
from splitfuse.engine.kv_cache.hashing import hash_block
from splitfuse.engine.protocol import BlockRemoved, BlockStored
from splitfuse.engine.request import Request
from splitfuse.sampling_params import SamplingParams


def make_request(request_id: str, token_ids: list[int]) -> Request:
    return Request(request_id, token_ids, SamplingParams(), arrival_time=0.0, max_tokens=16)


def test_allocate_takes_blocks_from_the_front_in_order():
    pool = BlockPool(6)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    assert pool.free_block_ids() == [5]
    assert pool.ref_cnt == [1, 1, 1, 1, 1, 0]


def test_allocate_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(2)
    with pytest.raises(RuntimeError, match="asked for 3 blocks, only 2 free"):
        pool.allocate(3)
    assert pool.free_block_ids() == [0, 1]


def test_freed_blocks_join_the_back_in_the_order_freed():
    pool = BlockPool(4)
    pool.allocate(4)
    pool.free([2, 0])
    pool.free([3])
    assert pool.free_block_ids() == [2, 0, 3]
    assert pool.allocate(2) == [2, 0]


def test_shared_block_is_free_only_after_its_last_reference():
    pool = BlockPool(3)
    (block,) = pool.allocate(1)
    pool.touch([block])
    assert pool.ref_cnt[block] == 2
    pool.free([block])
    assert block not in pool.free_block_ids()
    pool.free([block])
    assert pool.free_block_ids() == [1, 2, 0]
    with pytest.raises(RuntimeError, match="block 0 freed more often than allocated"):
        pool.free([block])


def test_cached_free_block_is_hit_until_evicted_lru():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    hashes = [hash_block(None, [i]) for i in range(3)]
    for block, block_hash in zip(blocks, hashes):
        pool.cache_block(block, block_hash)
    pool.free([1, 0, 2])  # eviction order: 1, then 0, then 2
    assert [pool.get_cached_block(h) for h in hashes] == [0, 1, 2]
    # A hit takes the block out of the free queue.
    pool.touch([0])
    assert pool.free_block_ids() == [1, 2]
    # Reuse evicts block 1's hash, not block 2's.
    assert pool.allocate(1) == [1]
    assert pool.get_cached_block(hashes[1]) is None
    assert pool.get_cached_block(hashes[2]) == 2


def test_duplicate_hash_keeps_the_first_cached_block():
    pool = BlockPool(2)
    pool.allocate(2)
    block_hash = hash_block(None, [7])
    pool.cache_block(0, block_hash)
    pool.cache_block(1, block_hash)
    assert pool.get_cached_block(block_hash) == 0
    assert pool.block_hash[1] is None


def test_chained_hash_depends_on_the_whole_prefix():
    assert hash_block(hash_block(None, [1, 2]), [3, 4]) != hash_block(hash_block(None, [9, 9]), [3, 4])
    assert hash_block(None, [1, 2]) == hash_block(None, [1, 2])


def test_manager_prefix_hit_leaves_at_least_one_token_to_compute():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    first = make_request("a", list(range(8)))           # exactly two full blocks
    assert manager.get_computed_blocks(first) == []
    assert manager.allocate_slots(first, 8)
    assert manager.get_block_table("a") == [0, 1]
    first.num_computed_tokens = 8
    manager.cache_computed_blocks(first)

    same = make_request("b", list(range(8)))
    # All 8 tokens are cached, but the last must be computed to sample: only block 0 is a hit.
    assert manager.get_computed_blocks(same) == [0]
    longer = make_request("c", list(range(10)))
    assert manager.get_computed_blocks(longer) == [0, 1]
    assert manager.allocate_slots(longer, 2, [0, 1])
    assert manager.get_block_table("c") == [0, 1, 2]
    assert manager.pool.ref_cnt[:3] == [2, 2, 1]


def test_manager_allocation_failure_changes_nothing():
    manager = KVCacheManager(num_blocks=3, block_size=4)
    request = make_request("a", list(range(20)))
    assert not manager.allocate_slots(request, 20)   # needs 5 blocks
    assert manager.num_free_blocks == 3
    assert "a" not in manager.block_tables


def test_manager_frees_tail_first_so_tail_is_evicted_first():
    manager = KVCacheManager(num_blocks=4, block_size=2)
    request = make_request("a", [1, 2, 3, 4, 5, 6])
    assert manager.allocate_slots(request, 6)
    request.num_computed_tokens = 6
    manager.cache_computed_blocks(request)
    manager.free(request)
    assert manager.pool.free_block_ids() == [3, 2, 1, 0]
    # The prefix [1, 2, 3, 4] survives one eviction-worth of new allocations.
    manager.pool.allocate(2)
    again = make_request("b", [1, 2, 3, 4, 9])
    assert manager.get_computed_blocks(again) == [0, 1]



# -- KV received from elsewhere (adopt) and rolled back (truncate) -------------------------------

def test_adopt_makes_free_blocks_the_table_and_caches_their_full_blocks():
    manager = KVCacheManager(num_blocks=6, block_size=4)
    request = make_request("a", list(range(10)))
    manager.adopt(request, [4, 1, 3], num_computed_tokens=10)
    assert manager.get_block_table("a") == [4, 1, 3]
    assert request.num_computed_tokens == 10
    assert manager.pool.free_block_ids() == [0, 2, 5]
    assert manager.pool.ref_cnt == [0, 1, 0, 1, 1, 0]
    # Tokens 0..7 fill blocks 4 and 1, which enter the prefix cache; block 3 (tokens 8, 9) is partial.
    h0 = hash_block(None, [0, 1, 2, 3])
    h1 = hash_block(h0, [4, 5, 6, 7])
    assert manager.take_events() == [BlockStored([h0], [4], None), BlockStored([h1], [1], h0)]
    assert manager.get_computed_blocks(make_request("b", list(range(10)))) == [4, 1]


def test_adopt_evicts_the_old_hash_of_a_cached_free_block():
    manager = KVCacheManager(num_blocks=2, block_size=2)
    first = make_request("a", [7, 8])
    assert manager.allocate_slots(first, 2)
    first.num_computed_tokens = 2
    manager.cache_computed_blocks(first)
    manager.free(first)
    manager.take_events()
    manager.adopt(make_request("b", [1, 2, 3]), [0], num_computed_tokens=1)
    assert manager.take_events() == [BlockRemoved([hash_block(None, [7, 8])])]
    assert manager.get_computed_blocks(make_request("c", [7, 8, 9])) == []


@pytest.mark.parametrize("block_ids, message", [
    ([0, 2], "block 2 is not a free block of this pool"),
    ([0, 6], "block 6 is not a free block of this pool"),
    ([0], r"2 distinct blocks are needed to hold 6 tokens, got \[0\]"),
    ([0, 0], r"2 distinct blocks are needed to hold 6 tokens, got \[0, 0\]"),
])
def test_adopt_of_blocks_that_cannot_be_taken_raises_and_changes_nothing(block_ids, message):
    manager = KVCacheManager(num_blocks=6, block_size=4)
    assert manager.allocate_slots(make_request("owner", list(range(100, 112))), 12)  # blocks 0, 1, 2
    manager.free(make_request("owner", []))   # frees 2, 1, 0: the free queue is [3, 4, 5, 2, 1, 0]
    assert manager.allocate_slots(make_request("user", list(range(200, 204))), 4)  # takes block 3
    manager.pool.touch([2])                   # ... and block 2 is in use too
    request = make_request("a", list(range(6)))
    free_before = manager.pool.free_block_ids()
    assert free_before == [4, 5, 1, 0]
    with pytest.raises(ValueError, match=message):
        manager.adopt(request, block_ids, num_computed_tokens=6)
    assert manager.pool.free_block_ids() == free_before
    assert manager.pool.ref_cnt == [0, 0, 1, 1, 0, 0]
    assert "a" not in manager.block_tables and request.num_computed_tokens == 0


def test_adopt_into_a_request_that_holds_blocks_raises():
    manager = KVCacheManager(num_blocks=4, block_size=4)
    request = make_request("a", list(range(6)))
    assert manager.allocate_slots(request, 6)
    with pytest.raises(ValueError, match="request 'a' already holds blocks"):
        manager.adopt(request, [2, 3], num_computed_tokens=6)
    assert manager.get_block_table("a") == [0, 1] and manager.pool.free_block_ids() == [2, 3]


def computed_request(manager, request_id, prompt, output):
    """A request whose prompt + output tokens all have KV (so its full blocks are cached)."""
    request = make_request(request_id, list(prompt))
    for token_id in output:
        request.append_output_token(token_id)
    hits = manager.get_computed_blocks(request)
    assert manager.allocate_slots(request, request.num_tokens - len(hits) * manager.block_size, hits)
    request.num_computed_tokens = request.num_tokens
    manager.cache_computed_blocks(request)
    return request


def test_truncate_frees_tail_blocks_tail_first_and_uncaches_the_block_it_cuts():
    manager = KVCacheManager(num_blocks=6, block_size=4)
    request = computed_request(manager, "a", range(6), range(6, 13))  # 13 tokens in blocks 0..3
    manager.take_events()
    # Keep 6 tokens: block 1 (tokens 4..7) is kept but tokens 6, 7 will be written again.
    assert manager.truncate(request, 6) == [3, 2]
    assert manager.get_block_table("a") == [0, 1]
    assert manager.pool.free_block_ids() == [4, 5, 3, 2]
    h0 = hash_block(None, [0, 1, 2, 3])
    h1 = hash_block(h0, [4, 5, 6, 7])
    assert manager.take_events() == [BlockRemoved([h1])]
    assert manager.pool.block_hash[1] is None and manager.pool.get_cached_block(h0) == 0
    # Block 2 (tokens 8..11) is free but keeps its hash: its KV is still right for that prefix.
    assert manager.pool.block_hash[2] == hash_block(h1, [8, 9, 10, 11])
    assert request.all_token_ids == [0, 1, 2, 3, 4, 5]
    assert request.output_token_ids == [] and request.num_computed_tokens == 6
    assert request.block_hashes == [h0]


def test_truncate_on_a_block_boundary_keeps_the_last_kept_block_cached():
    manager = KVCacheManager(num_blocks=6, block_size=4)
    request = computed_request(manager, "a", range(6), range(6, 13))
    manager.take_events()
    assert manager.truncate(request, 8) == [3, 2]
    assert manager.take_events() == []
    assert request.output_token_ids == [6, 7] and request.num_computed_tokens == 8
    # Computing the next block again caches it anew (block 4 is the next free one).
    for token_id in (20, 21, 22, 23):
        request.append_output_token(token_id)
    assert manager.allocate_slots(request, 4)
    request.num_computed_tokens = 12
    manager.cache_computed_blocks(request)
    h1 = hash_block(hash_block(None, [0, 1, 2, 3]), [4, 5, 6, 7])
    assert manager.take_events() == [BlockStored([hash_block(h1, [20, 21, 22, 23])], [4], h1)]


def test_truncate_into_a_shared_cached_block_raises_and_changes_nothing():
    manager = KVCacheManager(num_blocks=6, block_size=4)
    a = computed_request(manager, "a", range(4), range(4, 9))   # 9 tokens: blocks 0, 1 cached, 2 partial
    b = computed_request(manager, "b", range(9), [])            # hits blocks 0, 1
    assert manager.get_block_table("b") == [0, 1, 3]
    with pytest.raises(ValueError, match="block 1 is shared with another request and cannot be rewritten"):
        manager.truncate(a, 6)
    assert manager.get_block_table("a") == [0, 1, 2]
    assert a.all_token_ids == list(range(9)) and a.num_computed_tokens == 9
    assert manager.pool.get_cached_block(b.block_hashes[1]) == 1


def test_truncate_into_the_prompt_raises():
    manager = KVCacheManager(num_blocks=6, block_size=4)
    request = computed_request(manager, "a", range(4), range(4, 9))
    with pytest.raises(ValueError, match="cannot truncate 'a' to 3 tokens: it has 4 prompt and 5 output tokens"):
        manager.truncate(request, 3)


def test_adopt_with_more_computed_tokens_than_the_request_has_raises():
    manager = KVCacheManager(num_blocks=6, block_size=4)
    with pytest.raises(ValueError, match=r"num_computed_tokens 11 is outside \[0, 10\]"):
        manager.adopt(make_request("a", list(range(10))), [0, 1, 2], num_computed_tokens=11)
    assert manager.pool.free_block_ids() == [0, 1, 2, 3, 4, 5]
