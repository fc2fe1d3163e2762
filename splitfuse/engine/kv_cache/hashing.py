"""Chained block hashes for prefix caching: a block's key covers every token before it."""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import numpy as np

BlockHash = bytes

# The root of every chain; distinct from any digest.
_ROOT = b"splitfuse-root"


def hash_block(parent: Optional[BlockHash], token_ids: Sequence[int]) -> BlockHash:
    """128-bit digest of (parent digest, this block's token ids).

    Chaining makes equal keys mean equal whole prefixes, not just equal blocks:
    hash_block(hash_block(None, [1, 2]), [3, 4]) != hash_block(hash_block(None, [9, 9]), [3, 4]).
    """
    digest = hashlib.blake2b(parent or _ROOT, digest_size=16)
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return digest.digest()


def extend_block_hashes(hashes: list[BlockHash], token_ids: Sequence[int], block_size: int) -> None:
    """Appends the hashes of every newly full block of ``token_ids`` to ``hashes`` in place."""
    num_full_blocks = len(token_ids) // block_size
    for block_index in range(len(hashes), num_full_blocks):
        start = block_index * block_size
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block(parent, token_ids[start:start + block_size]))
