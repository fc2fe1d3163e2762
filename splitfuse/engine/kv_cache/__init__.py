"""Paged KV cache bookkeeping: block pool, prefix hashing, per-request block tables."""

from splitfuse.engine.kv_cache.block_pool import BlockPool
from splitfuse.engine.kv_cache.manager import KVCacheManager

__all__ = ["BlockPool", "KVCacheManager"]
