"""FlashInfer attention on CUDA: its batch prefill wrapper over our paged KV layout, planned once per step.

FlashInfer (``pip install flashinfer-python``) has the same plan/run split as our backend interface:
``plan`` takes the batch's page table (CSR: per request, its pages and how full the last one is) and
``run`` computes every layer. One wrapper serves the whole mixed batch: a decode is a request with one
query row, a prompt chunk one with several, each query aligned to the end of its KV (causal). Our
token-major cache ``[slots, KVH, D]`` is FlashInfer's NHD page layout ``[pages, page_size, KVH, D]``
as a view, so no KV is copied. The KV write is ours (``write_kv_cache``), just before the first layer's run.

The wrappers are planned lazily at the step's first layer, once per sliding window (FlashInfer plans
the window and the softmax scale with the batch); the page table's arrays are built on the host here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from splitfuse.attention.backend import BatchLayout, strip_padding, token_major_kv_cache_shape, write_kv_cache

_WORKSPACE_BYTES = 128 << 20  # FlashInfer's float workspace, as its documentation sizes it


@dataclass(frozen=True)
class PageTable:
    """A step's batch in FlashInfer's CSR form (int32, host side).

    Request i's query rows are ``qo_indptr[i]:qo_indptr[i+1]``; its KV pages ``kv_indices[kv_indptr[i]:
    kv_indptr[i+1]]``, of which the last holds ``last_page_len[i]`` tokens (1..page_size).
    Example, block size 4, query_lens [1, 3], context_lens [6, 3], tables [[7, 2], [5, 0]] ->
    qo_indptr [0, 1, 4], kv_indptr [0, 2, 3], kv_indices [7, 2, 5], last_page_len [2, 3].
    """

    qo_indptr: np.ndarray
    kv_indptr: np.ndarray
    kv_indices: np.ndarray
    last_page_len: np.ndarray


def page_table(layout: BatchLayout) -> PageTable:
    context_lens = layout.context_lens.astype(np.int64)
    if (context_lens < 1).any():
        raise ValueError("the FlashInfer backend needs every request to have at least one token of KV")
    pages = -(-context_lens // layout.block_size)
    kv_indptr = np.zeros(len(pages) + 1, dtype=np.int32)
    np.cumsum(pages, out=kv_indptr[1:])
    columns = np.arange(layout.block_tables.shape[1])[None, :]
    kv_indices = layout.block_tables[columns < pages[:, None]]  # row by row: each request's first pages
    last_page_len = context_lens - (pages - 1) * layout.block_size
    return PageTable(layout.query_start_loc.astype(np.int32), kv_indptr, kv_indices.astype(np.int32),
                     last_page_len.astype(np.int32))


def window_left(sliding_window: Optional[int]) -> int:
    """FlashInfer's ``window_left``: a query at position p sees keys p - window_left .. p (-1: all).

    Ours: a key is visible iff p - window < k <= p, so window 4 -> window_left 3."""
    return -1 if sliding_window is None else sliding_window - 1


@dataclass
class FlashInferMetadata:
    slot_mapping: torch.Tensor
    block_size: int
    table: PageTable
    kv_indices: torch.Tensor  # on the device; FlashInfer's plan reads the other three arrays on the host
    planned: dict[Optional[int], Any] = field(default_factory=dict)  # window -> the wrapper planned for this step


class FlashInferBackend:
    """Needs ``flashinfer`` importable and a CUDA device; the platform picks it only then."""

    def __init__(self, device: torch.device) -> None:
        import flashinfer  # noqa: PLC0415 - optional: only CUDA installs have it

        self.device = device
        self._flashinfer = flashinfer
        self._workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._wrappers: dict[Optional[int], Any] = {}  # one per sliding window, reused step after step

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return token_major_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)

    def plan(self, layout: BatchLayout, sliding_windows: tuple[Optional[int], ...]) -> FlashInferMetadata:
        table = page_table(layout)
        kv_indices = torch.from_numpy(table.kv_indices).to(self.device, non_blocking=True)
        return FlashInferMetadata(layout.slot_mapping, layout.block_size, table, kv_indices)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], metadata: FlashInferMetadata, *,
                scale: float, sliding_window: Optional[int]) -> torch.Tensor:
        num_tokens = metadata.slot_mapping.shape[0]
        key, value, output = strip_padding(query, key, value, num_tokens)
        write_kv_cache(kv_cache, key, value, metadata.slot_mapping)
        key_cache, value_cache = kv_cache
        num_kv_heads, head_dim = key_cache.shape[1], key_cache.shape[2]
        block_size = metadata.block_size
        pages = (key_cache.view(-1, block_size, num_kv_heads, head_dim),
                 value_cache.view(-1, block_size, num_kv_heads, head_dim))
        wrapper = metadata.planned.get(sliding_window)
        if wrapper is None:
            wrapper = self._wrapper(sliding_window)
            table = metadata.table
            wrapper.plan(torch.from_numpy(table.qo_indptr), torch.from_numpy(table.kv_indptr), metadata.kv_indices,
                         torch.from_numpy(table.last_page_len), query.shape[1], num_kv_heads,
                         head_dim, block_size, causal=True, sm_scale=scale, window_left=window_left(sliding_window),
                         q_data_type=query.dtype, kv_data_type=key_cache.dtype)
            metadata.planned[sliding_window] = wrapper
        output[:num_tokens] = wrapper.run(query[:num_tokens].contiguous(), pages)
        return output

    def _wrapper(self, sliding_window: Optional[int]) -> Any:
        if sliding_window not in self._wrappers:
            self._wrappers[sliding_window] = self._flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                self._workspace, kv_layout="NHD")
        return self._wrappers[sliding_window]
