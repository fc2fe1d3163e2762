"""KVCacheManager: gives each request the blocks it needs, finds prefix-cache hits, frees on finish."""

from __future__ import annotations

from splitfuse.engine.kv_cache.block_pool import BlockPool
from splitfuse.engine.kv_cache.hashing import extend_block_hashes
from splitfuse.engine.request import Request


class KVCacheManager:
    """Block tables per request over one BlockPool.

    Contract: ``allocate_slots`` either gives a request room for ``num_new_tokens``
    more tokens and returns True, or changes nothing and returns False. A block is
    entered in the prefix cache only after its tokens' KV has been computed
    (``cache_computed_blocks``), so a hit never reads KV that was not written.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.block_tables: dict[str, list[int]] = {}
        self._num_cached_blocks: dict[str, int] = {}  # leading blocks of each request already in the cache
        # Prefix-cache statistics, in tokens.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> list[int]:
        """The longest run of cached blocks that starts the request's tokens.

        At least one token is always left to compute, because the step that
        computes the last known token is the one that samples the next.
        """
        if not self.enable_caching:
            return []
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block_id = self.pool.get_cached_block(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Counts one admitted request's lookup (a request that waits is looked up again each step)."""
        if self.enable_caching:
            self.prefix_cache_queries += num_tokens
            self.prefix_cache_hits += num_hit_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[int] | None = None) -> bool:
        """Room for ``num_new_tokens`` after the request's computed tokens (and ``computed_blocks`` hits)."""
        computed_blocks = computed_blocks or []
        table = self.block_tables.get(request.request_id)
        if table is None:
            table = []
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_required = self.blocks_needed(num_computed + num_new_tokens)
        num_new_blocks = max(0, num_required - len(table) - len(computed_blocks))
        if num_new_blocks == 0 and not computed_blocks:
            return True  # the common decode step: the last block still has room
        # Hits on free blocks leave the free queue, so they count against what is free.
        num_hits_on_free = sum(1 for b in computed_blocks if self.pool.ref_cnt[b] == 0)
        if num_new_blocks + num_hits_on_free > self.pool.num_free_blocks:
            return False
        self.pool.touch(computed_blocks)
        self.block_tables[request.request_id] = table
        table.extend(computed_blocks)
        table.extend(self.pool.allocate(num_new_blocks))
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Enters every full block whose KV is now computed into the prefix cache."""
        if not self.enable_caching:
            return
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size)
        table = self.block_tables[request.request_id]
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_hashes))
        start = self._num_cached_blocks.get(request.request_id, 0)
        for index in range(start, num_full):
            parent = request.block_hashes[index - 1] if index else None
            self.pool.cache_block(table[index], request.block_hashes[index], parent)
        self._num_cached_blocks[request.request_id] = max(start, num_full)

    def adopt(self, request: Request, block_ids: list[int], num_computed_tokens: int) -> None:
        """Gives a request KV computed elsewhere (received, migrated) in these free blocks of this pool.

        The blocks become the request's whole block table, in order, and its first
        ``num_computed_tokens`` tokens count as computed; their full blocks enter the prefix
        cache. Raises ValueError, changing nothing, if the request holds blocks already, a
        block is not free, or the blocks cannot hold the tokens.
        """
        if self.block_tables.get(request.request_id):
            raise ValueError(f"request {request.request_id!r} already holds blocks")
        if not 0 <= num_computed_tokens <= request.num_tokens:
            raise ValueError(f"num_computed_tokens {num_computed_tokens} is outside [0, {request.num_tokens}]")
        if len(set(block_ids)) != len(block_ids) or self.blocks_needed(num_computed_tokens) > len(block_ids):
            raise ValueError(f"{self.blocks_needed(num_computed_tokens)} distinct blocks are needed to hold "
                             f"{num_computed_tokens} tokens, got {block_ids}")
        self.pool.take_free_blocks(block_ids)
        self.block_tables[request.request_id] = list(block_ids)
        request.num_computed_tokens = num_computed_tokens
        self.cache_computed_blocks(request)

    def truncate(self, request: Request, num_tokens: int) -> list[int]:
        """Forgets the request's tokens from ``num_tokens`` on (rejected draft tokens, a rollback).

        Its computed count drops to at most ``num_tokens``; blocks past the last one still
        needed are freed (returned, tail first); a cached block that would be written again
        loses its hash. Raises ValueError if that block is shared with another request, or
        if ``num_tokens`` would cut into the prompt.
        """
        if not request.num_prompt_tokens <= num_tokens <= request.num_tokens:
            raise ValueError(f"cannot truncate {request.request_id!r} to {num_tokens} tokens: it has "
                             f"{request.num_prompt_tokens} prompt and {request.num_output_tokens} output tokens")
        table = self.block_tables.get(request.request_id, [])
        keep_blocks = self.blocks_needed(num_tokens)
        partial = num_tokens // self.block_size  # the block holding token num_tokens, if kept
        if partial < min(keep_blocks, len(table)) and self.pool.block_hash[table[partial]] is not None:
            if self.pool.ref_cnt[table[partial]] > 1:
                raise ValueError(f"block {table[partial]} is shared with another request and cannot be rewritten")
            self.pool.uncache_block(table[partial])
        freed = table[keep_blocks:]
        del table[keep_blocks:]
        self.pool.free(reversed(freed))
        del request.all_token_ids[num_tokens:]
        del request.output_token_ids[num_tokens - request.num_prompt_tokens:]
        del request.block_hashes[num_tokens // self.block_size:]
        request.num_computed_tokens = min(request.num_computed_tokens, num_tokens)
        if request.request_id in self._num_cached_blocks:
            self._num_cached_blocks[request.request_id] = min(self._num_cached_blocks[request.request_id],
                                                              num_tokens // self.block_size)
        return list(reversed(freed))

    def take_events(self) -> list:
        """The prefix cache's KV events since the last call (``protocol.BlockStored`` / ``BlockRemoved``)."""
        return self.pool.take_events()

    def free(self, request: Request) -> None:
        """Releases the request's blocks, last block first (so it is evicted first)."""
        table = self.block_tables.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        if table:
            self.pool.free(reversed(table))

    def get_block_table(self, request_id: str) -> list[int]:
        return self.block_tables[request_id]
