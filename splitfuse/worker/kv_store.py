"""KVStore: every layer's paged KV tensors, and block-level reads and writes for moving KV between engines.

The attention backend declares the layout (``AttentionBackend.kv_cache_shape``); the one thing
the store relies on is that a block is a contiguous slab of each tensor's leading dimension
(true of ``[num_blocks * block_size, kv_heads, head_dim]`` and of any block-major layout), so a
block's KV in one layer is ``tensor.view(num_blocks, -1)[block_id]``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from splitfuse.attention.backend import AttentionBackend, allocate_kv_cache

KVCache = tuple[torch.Tensor, torch.Tensor]


class KVStore:
    def __init__(self, backend: AttentionBackend, num_layers: int, num_blocks: int, block_size: int,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = backend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
        self.layers: list[KVCache] = allocate_kv_cache(num_layers, shape, dtype, device)
        # Per layer, key and value as [num_blocks, elements of one block]: views, no copies.
        self._block_views = [(key.view(num_blocks, -1), value.view(num_blocks, -1)) for key, value in self.layers]

    @property
    def bytes_per_block(self) -> int:
        """A block's KV bytes over every layer, key and value."""
        key = self.layers[0][0]
        return 2 * len(self.layers) * self.block_elements * key.element_size()

    @property
    def block_elements(self) -> int:
        return self._block_views[0][0].shape[1]

    def _index(self, block_ids: Sequence[int]) -> torch.Tensor:
        bad = [b for b in block_ids if not 0 <= b < self.num_blocks]
        if bad:
            raise ValueError(f"block id {bad[0]} is outside the pool (0..{self.num_blocks - 1})")
        return torch.tensor(list(block_ids), dtype=torch.long, device=self.layers[0][0].device)

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """A copy of these blocks' KV in every layer: [num_layers, 2 (key, value), len(block_ids), block_elements]."""
        index = self._index(block_ids)
        return torch.stack([torch.stack([key.index_select(0, index), value.index_select(0, index)])
                            for key, value in self._block_views])

    def write_blocks(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Writes ``data`` (as ``read_blocks`` returns it) into these blocks of every layer."""
        expected = (len(self._block_views), 2, len(block_ids), self.block_elements)
        if tuple(data.shape) != expected:
            raise ValueError(f"KV data of shape {tuple(data.shape)} does not fit {len(block_ids)} blocks "
                             f"(expected {expected})")
        index = self._index(block_ids)
        for layer, (key, value) in enumerate(self._block_views):
            key.index_copy_(0, index, data[layer, 0].to(key.dtype))
            value.index_copy_(0, index, data[layer, 1].to(value.dtype))

    def copy_blocks(self, src_block_ids: Sequence[int], dst_block_ids: Sequence[int]) -> None:
        if len(src_block_ids) != len(dst_block_ids):
            raise ValueError(f"{len(src_block_ids)} source blocks for {len(dst_block_ids)} destinations")
        self.write_blocks(dst_block_ids, self.read_blocks(src_block_ids))
