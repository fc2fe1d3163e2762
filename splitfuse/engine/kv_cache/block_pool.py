"""BlockPool: the KV blocks, their reference counts, and the free queue that doubles as the prefix cache."""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Optional

from splitfuse.engine.kv_cache.hashing import BlockHash
from splitfuse.engine.protocol import BlockRemoved, BlockStored, KVEvent


class BlockPool:
    """Owns ``num_blocks`` block ids and decides which free block is reused next.

    Free queue (eviction order): blocks with ref_cnt == 0, least recently freed
    first. At start it holds 0, 1, ..., num_blocks - 1 in that order. A freed block
    goes to the back and keeps its hash, so it can still be hit by the prefix cache
    until it reaches the front and is reused; a cache hit on a free block takes it
    out of the queue. Callers free a request's blocks tail first, so a request's
    last blocks (least likely to be shared) are evicted before its first ones.

    Every change to the prefix cache is recorded as a KV event (``take_events``), in order,
    for a router's prefix index.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[Optional[BlockHash]] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self._events: list[KVEvent] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def free_block_ids(self) -> list[int]:
        """The free queue, front (next to be reused) first."""
        return list(self._free)

    def get_cached_block(self, block_hash: BlockHash) -> Optional[int]:
        return self._cached.get(block_hash) if self.enable_caching else None

    def allocate(self, num_blocks: int) -> list[int]:
        """Takes ``num_blocks`` blocks from the front of the free queue, evicting their hashes."""
        if num_blocks > len(self._free):
            raise RuntimeError(f"asked for {num_blocks} blocks, only {len(self._free)} free")
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            self._evict(block_id)
            self.ref_cnt[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Takes a reference on cached blocks (prefix-cache hits), removing free ones from the queue."""
        for block_id in block_ids:
            if self.ref_cnt[block_id] == 0:
                del self._free[block_id]
            self.ref_cnt[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drops one reference from each block, in the order given; blocks reaching zero join the back."""
        for block_id in block_ids:
            if self.ref_cnt[block_id] <= 0:
                raise RuntimeError(f"block {block_id} freed more often than allocated")
            self.ref_cnt[block_id] -= 1
            if self.ref_cnt[block_id] == 0:
                self._free[block_id] = None

    def take_events(self) -> list[KVEvent]:
        """The KV events since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def take_free_blocks(self, block_ids: list[int]) -> None:
        """Takes these free blocks out of the queue with one reference each (their hashes evicted):
        their KV is about to be written from outside (``KVCacheManager.adopt``)."""
        for block_id in block_ids:
            if not 0 <= block_id < self.num_blocks or self.ref_cnt[block_id] != 0:
                raise ValueError(f"block {block_id} is not a free block of this pool")
        for block_id in block_ids:
            del self._free[block_id]
            self._evict(block_id)
            self.ref_cnt[block_id] = 1

    def uncache_block(self, block_id: int) -> None:
        """Drops a block's hash (its contents are about to change); it stays allocated."""
        self._evict(block_id)

    def cache_block(self, block_id: int, block_hash: BlockHash, parent: Optional[BlockHash] = None) -> None:
        """Marks a full, computed block as holding the prefix ``block_hash``.

        If another block already holds that prefix, the first one stays the
        cached copy and this block stays private (it is freed as usual).
        """
        if not self.enable_caching or self.block_hash[block_id] is not None:
            return
        if block_hash in self._cached:
            return
        self.block_hash[block_id] = block_hash
        self._cached[block_hash] = block_id
        self._events.append(BlockStored([block_hash], [block_id], parent))

    def _evict(self, block_id: int) -> None:
        block_hash = self.block_hash[block_id]
        if block_hash is not None:
            del self._cached[block_hash]
            self.block_hash[block_id] = None
            self._events.append(BlockRemoved([block_hash]))

    def reset_prefix_cache(self) -> None:
        """Forgets every hash of a free block (e.g. after weights change)."""
        for block_id in list(self._free):
            self._evict(block_id)
