"""Attention backend interface: ``plan`` once per step from the batch layout, ``forward`` per layer."""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np

import torch


@dataclass
class BatchLayout:
    """The flattened ragged batch, as the model runner built it (numpy, host side).

    Requests are ordered decodes first (one query token each), then the rest.
    For request i: its new tokens are rows ``query_start_loc[i]:query_start_loc[i+1]``
    of the flat batch and sit at positions ``context_lens[i] - query_lens[i]`` ..
    ``context_lens[i] - 1``; ``block_tables[i, :]`` are its KV blocks (padded with 0).
    Example: query_lens [1, 1, 5] -> query_start_loc [0, 1, 2, 7], num_decodes 2.
    """

    query_lens: np.ndarray        # [num_reqs] int64
    context_lens: np.ndarray      # [num_reqs] int64, tokens with KV after this step
    query_start_loc: np.ndarray   # [num_reqs + 1] int64
    block_tables: np.ndarray      # [num_reqs, max_blocks] int64
    slot_mapping: torch.Tensor    # [num_tokens] int64, on the device: where each new token's KV goes
    num_decodes: int
    block_size: int


class AttentionBackend(Protocol):
    """A paged attention implementation. ``plan`` may precompute anything shared by layers."""

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """The shape of one layer's key tensor (and of its value tensor) that ``forward`` reads and writes."""
        ...

    def plan(self, layout: BatchLayout, sliding_windows: tuple[Optional[int], ...]) -> Any:
        ...

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], metadata: Any, *,
                scale: float, sliding_window: Optional[int]) -> torch.Tensor:
        """query [T, H, D], key/value [T, KVH, D] -> [T, H, D]; writes key/value into kv_cache first.

        T may exceed the step's token count (len(slot_mapping)): the runner pads the batch for
        packed matmuls. Padding rows are not attention rows: no KV is written for them and their
        output rows are zero.
        """
        ...


def strip_padding(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_tokens: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The padding part of ``AttentionBackend.forward``'s contract, for every backend.

    Returns key and value cut to the step's ``num_tokens`` rows (what goes into the cache) and an
    output buffer with query's shape whose padding rows are already zero.
    """
    output = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if query.shape[0] > num_tokens:
        key, value = key[:num_tokens], value[:num_tokens]
        output[num_tokens:] = 0
    return key, value, output


def token_major_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
                               ) -> tuple[int, int, int]:
    """One row per token slot (slot = block * block_size + offset): 4 blocks of 16, 2 KV heads of 64 -> (64, 2, 64)."""
    return (num_blocks * block_size, num_kv_heads, head_dim)


def write_kv_cache(kv_cache: tuple[torch.Tensor, torch.Tensor], key: torch.Tensor, value: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """key_cache[slot_mapping[t]] = key[t] and the same for value, with torch ops (any device, any dtype)."""
    kv_cache[0].index_copy_(0, slot_mapping, key)
    kv_cache[1].index_copy_(0, slot_mapping, value)


def allocate_kv_cache(num_layers: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (key, value) pair per layer, each of ``shape`` (the backend's ``kv_cache_shape``), all zeros.

    On the CPU the pool is one anonymous memory map: the kernel hands out zeroed pages on first touch, so
    a large pool costs nothing at start-up (torch.zeros writes every page: seconds for a few GiB) and only
    the blocks in use take memory."""
    if device.type != "cpu":
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in range(num_layers)]
    element_size = torch.empty((), dtype=dtype).element_size()
    pool = mmap.mmap(-1, num_layers * 2 * math.prod(shape) * element_size)
    flat = torch.frombuffer(pool, dtype=dtype)  # holds a reference to the map: it lives as long as the views
    tensors = flat.view(num_layers, 2, *shape)
    return [(tensors[layer, 0], tensors[layer, 1]) for layer in range(num_layers)]


def kv_cache_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                             dtype: torch.dtype) -> int:
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size
