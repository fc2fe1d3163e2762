"""CPU paged attention: a C kernel that reads the paged KV cache in place (and SDPA for long chunks, if asked).

Decodes and prompt chunks go to the kernel in ``csrc/paged_attention.c`` (one call per layer for
all of them): it walks each request's block table, so no context is copied out of the cache,
which is where the torch-native backend spends most of a decode step. Each query row's arithmetic in
the kernel is the same whatever else is in the call (its keys in one fixed order of 16-key
sub-blocks; rows that share key loads never share sums), so a row's result does not depend on
its batch, its chunk or whether its prefix came from the cache: that is ``batch_invariant``.
Without it, chunks longer than ``KERNEL_MAX_QUERY_TOKENS`` go to SDPA, whose blocked matmuls
are faster there but pick their blocking (and so their rounding) by shape.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from splitfuse.attention.backend import BatchLayout, strip_padding, token_major_kv_cache_shape
from splitfuse.attention.torch_native import ChunkPlan, TorchNativeBackend, run_chunks
from splitfuse.platforms.cpu.kernels import DTYPE_CODES, CpuKernels

if TYPE_CHECKING:
    from splitfuse.models.config import ArchConfig

# Longer chunks go to SDPA (measured with benchmarks/attention_kernel.py: the kernel is faster
# at 16 new tokens, slower from 64 on, with or without a cached context).
KERNEL_MAX_QUERY_TOKENS = 16


@dataclass
class CpuPagedMetadata:
    slot_mapping: torch.Tensor
    block_size: int
    # Kept alive here: the kernel reads them through raw pointers.
    query_start_loc: np.ndarray
    context_lens: np.ndarray
    block_tables: np.ndarray
    kernel_requests: np.ndarray  # int32 indices of the requests the kernel computes
    chunks: list[ChunkPlan] = field(default_factory=list)
    # The arrays' addresses, taken once per step (numpy's .ctypes costs microseconds per use).
    pointers: tuple[int, int, int, int] = (0, 0, 0, 0)


def cpu_kernel_supported(kernels: CpuKernels, arch: Optional[ArchConfig], block_size: Optional[int]) -> bool:
    """Whether the C kernel can serve this model's attention (its limits are compiled in); None: not checked."""
    library = kernels.library
    heads_fit = arch is None or (arch.num_heads // arch.num_kv_heads <= library.paged_attention_max_rows()
                                 and arch.head_dim <= library.paged_attention_max_head_dim())
    return heads_fit and (block_size is None or block_size <= library.paged_attention_max_block_size())


class CpuPagedBackend:
    """Serves CPU tensors in bf16 or fp32 (the platform picks it only there), query/key/value as the model
    makes them: views of one fused qkv output, each head's values contiguous."""

    def __init__(self, kernels: CpuKernels, batch_invariant: bool = False) -> None:
        self._kernels = kernels
        self._kernel = kernels.library.paged_attention
        self._chunk_planner = TorchNativeBackend(torch.device("cpu"))
        self.batch_invariant = batch_invariant

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return token_major_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)

    def plan(self, layout: BatchLayout, sliding_windows: tuple[Optional[int], ...]) -> CpuPagedMetadata:
        to_sdpa = (np.zeros(len(layout.query_lens), dtype=bool) if self.batch_invariant
                   else layout.query_lens > KERNEL_MAX_QUERY_TOKENS)
        metadata = CpuPagedMetadata(
            layout.slot_mapping, layout.block_size,
            np.ascontiguousarray(layout.query_start_loc, dtype=np.int64),
            np.ascontiguousarray(layout.context_lens, dtype=np.int64),
            np.ascontiguousarray(layout.block_tables, dtype=np.int64),
            np.flatnonzero(~to_sdpa).astype(np.int32))
        metadata.chunks = [self._chunk_planner.plan_chunk(layout, int(i), sliding_windows)
                           for i in np.flatnonzero(to_sdpa)]
        metadata.pointers = (metadata.block_tables.ctypes.data, metadata.query_start_loc.ctypes.data,
                             metadata.context_lens.ctypes.data, metadata.kernel_requests.ctypes.data)
        return metadata

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], metadata: CpuPagedMetadata, *,
                scale: float, sliding_window: Optional[int]) -> torch.Tensor:
        key_cache, value_cache = kv_cache
        key, value, output = strip_padding(query, key, value, metadata.slot_mapping.shape[0])
        self._kernels.write_kv_cache(key_cache, value_cache, key, value, metadata.slot_mapping)
        if query.stride(2) != 1 or query.stride(1) != query.shape[2]:
            query = query.contiguous()
        requests = metadata.kernel_requests
        if len(requests):
            num_heads, head_dim = query.shape[1], query.shape[2]
            block_tables, query_start_loc, context_lens, request_ids = metadata.pointers
            self._kernel(DTYPE_CODES[query.dtype], output.data_ptr(), query.data_ptr(),
                         key_cache.data_ptr(), value_cache.data_ptr(), block_tables, metadata.block_tables.shape[1],
                         query_start_loc, context_lens, request_ids, len(requests), num_heads, key_cache.shape[1],
                         head_dim, metadata.block_size, ctypes.c_float(scale), sliding_window or 0, query.stride(0))
        run_chunks(metadata.chunks, output, query, key, value, kv_cache, metadata.block_size, scale=scale,
                   sliding_window=sliding_window)
        return output
