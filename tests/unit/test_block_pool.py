"""BlockPool and KVCacheManager: exact block ids, reference counts, LRU eviction order, prefix hits."""

import pytest

from splitfuse.engine.kv_cache import BlockPool, KVCacheManager
from splitfuse.engine.kv_cache.hashing import hash_block
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

