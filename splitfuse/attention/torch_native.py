"""Torch-native paged attention: the reference backend, on CPU and CUDA, built on SDPA.

Decodes (one query token) are batched into SDPA calls over their gathered context,
padded and masked; the runner orders decodes by context length and they are cut into
a few length buckets, so short contexts do not pay for the longest one. Every other request (a prompt chunk)
gets its own SDPA call: a chunk that starts at position 0 attends only to its own
new keys with a plain causal mask; a later chunk gathers its cached context.
Context is gathered a whole block at a time (index_select over blocks), which is
several times cheaper on CPU than gathering token by token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from splitfuse.attention.backend import BatchLayout, strip_padding, token_major_kv_cache_shape, write_kv_cache


@dataclass
class ChunkPlan:
    token_start: int
    token_end: int
    context_len: int
    context_blocks: Optional[torch.Tensor]  # [blocks]; None when the chunk is its whole context
    masks: dict[Optional[int], Optional[torch.Tensor]]  # window -> [q, ctx] bool (None: plain causal)


@dataclass
class _DecodeBucket:
    row_start: int
    row_end: int
    block_tables: torch.Tensor  # [rows, max_blocks]
    masks: dict[Optional[int], torch.Tensor]  # window -> [rows, 1, 1, max_blocks * block_size] bool


@dataclass
class TorchNativeMetadata:
    slot_mapping: torch.Tensor
    num_decodes: int
    block_size: int
    decode_buckets: list[_DecodeBucket] = field(default_factory=list)
    chunks: list[ChunkPlan] = field(default_factory=list)


# A new decode bucket starts where the context is this much longer than the bucket's first
# row (rows are sorted by context length), so padding wastes at most about a third.
_BUCKET_GROWTH = 1.5
_MIN_BUCKET_ROWS = 4


def decode_buckets(context_lens: np.ndarray) -> list[tuple[int, int]]:
    """Row ranges of sorted context lengths: [10, 11, 12, 13, 40, 41, 42, 43] -> [(0, 4), (4, 8)]."""
    buckets, start = [], 0
    for row in range(1, len(context_lens)):
        if row - start >= _MIN_BUCKET_ROWS and context_lens[row] > _BUCKET_GROWTH * context_lens[start]:
            buckets.append((start, row))
            start = row
    buckets.append((start, len(context_lens)))
    return buckets


class TorchNativeBackend:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return token_major_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)

    def plan(self, layout: BatchLayout, sliding_windows: tuple[Optional[int], ...]) -> TorchNativeMetadata:
        metadata = TorchNativeMetadata(layout.slot_mapping, layout.num_decodes, layout.block_size)
        if layout.num_decodes:
            self._plan_decodes(layout, sliding_windows, metadata)
        for i in range(layout.num_decodes, len(layout.query_lens)):
            metadata.chunks.append(self.plan_chunk(layout, i, sliding_windows))
        return metadata

    def _plan_decodes(self, layout: BatchLayout, windows: tuple[Optional[int], ...],
                      metadata: TorchNativeMetadata) -> None:
        context_lens = layout.context_lens[:layout.num_decodes]
        for row_start, row_end in decode_buckets(context_lens):
            lens = context_lens[row_start:row_end]
            num_blocks = -(-int(lens.max()) // layout.block_size)
            # Rows shorter than the longest are padded with block 0: a real block, masked out below.
            tables = torch.from_numpy(np.ascontiguousarray(layout.block_tables[row_start:row_end, :num_blocks]))
            positions = np.arange(num_blocks * layout.block_size)[None, :]
            masks = {}
            for window in windows:
                valid = positions < lens[:, None]
                if window is not None:
                    valid &= positions > (lens[:, None] - 1 - window)
                masks[window] = torch.from_numpy(valid[:, None, None, :].copy()).to(self.device)
            metadata.decode_buckets.append(_DecodeBucket(row_start, row_end, tables.to(self.device), masks))

    def plan_chunk(self, layout: BatchLayout, i: int, windows: tuple[Optional[int], ...]) -> ChunkPlan:
        query_len = int(layout.query_lens[i])
        context_len = int(layout.context_lens[i])
        start = context_len - query_len
        context_blocks = None
        if start > 0:
            num_blocks = -(-context_len // layout.block_size)
            context_blocks = torch.from_numpy(layout.block_tables[i, :num_blocks].copy()).to(self.device)
        plan = ChunkPlan(int(layout.query_start_loc[i]), int(layout.query_start_loc[i + 1]), context_len,
                          context_blocks, {})
        query_pos = np.arange(start, context_len)[:, None]
        key_pos = np.arange(context_len)[None, :]
        for window in windows:
            if start == 0 and (window is None or window >= context_len):
                plan.masks[window] = None  # plain causal over the chunk's own keys
                continue
            allowed = key_pos <= query_pos
            if window is not None:
                allowed &= key_pos > query_pos - window
            plan.masks[window] = torch.from_numpy(allowed).to(self.device)
        return plan

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], metadata: TorchNativeMetadata, *,
                scale: float, sliding_window: Optional[int]) -> torch.Tensor:
        key_cache, value_cache = kv_cache
        key, value, output = strip_padding(query, key, value, metadata.slot_mapping.shape[0])
        write_kv_cache(kv_cache, key, value, metadata.slot_mapping)
        block_size = metadata.block_size
        for bucket in metadata.decode_buckets:
            rows = slice(bucket.row_start, bucket.row_end)
            keys = _gather_blocks(key_cache, bucket.block_tables, block_size)  # [rows, blocks * size, KVH, Dh]
            values = _gather_blocks(value_cache, bucket.block_tables, block_size)
            output[rows] = _sdpa(query[rows].unsqueeze(1), keys, values, bucket.masks[sliding_window],
                                 scale).squeeze(1)
        run_chunks(metadata.chunks, output, query, key, value, kv_cache, block_size, scale=scale,
                   sliding_window=sliding_window)
        return output


def run_chunks(chunks: list[ChunkPlan], output: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], block_size: int, *,
               scale: float, sliding_window: Optional[int]) -> None:
    """SDPA per prompt chunk, writing its rows of ``output``.

    Back-to-back whole-prompt chunks of one length under a plain causal mask (a batch of equal
    prompts) share one batched call: SDPA computes each (chunk, head) on its own either way, so the
    results are the same, and 16 chunks of 128 tokens take ~2.4 instead of ~4.3 ms a layer.
    """
    key_cache, value_cache = kv_cache
    first = 0
    while first < len(chunks):
        chunk, end = chunks[first], first + 1
        if chunk.context_blocks is not None:
            rows = slice(chunk.token_start, chunk.token_end)
            chunk_key = _gather_blocks(key_cache, chunk.context_blocks, block_size)[:chunk.context_len]
            chunk_value = _gather_blocks(value_cache, chunk.context_blocks, block_size)[:chunk.context_len]
            output[rows] = _sdpa(query[rows].unsqueeze(0), chunk_key.unsqueeze(0), chunk_value.unsqueeze(0),
                                 chunk.masks[sliding_window], scale).squeeze(0)
            first = end
            continue
        length, mask = chunk.token_end - chunk.token_start, chunk.masks[sliding_window]
        while (mask is None and end < len(chunks) and chunks[end].context_blocks is None
               and chunks[end].masks[sliding_window] is None and chunks[end].token_start == chunks[end - 1].token_end
               and chunks[end].token_end - chunks[end].token_start == length):
            end += 1
        rows, count = slice(chunk.token_start, chunks[end - 1].token_end), end - first
        batched = [tensor[rows].view(count, length, *tensor.shape[1:]) for tensor in (query, key, value)]
        output[rows] = _sdpa(*batched, mask, scale).reshape(count * length, *query.shape[1:])
        first = end


def _gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """cache [slots, KVH, Dh], block_ids [..., B] -> [..., B * block_size, KVH, Dh]."""
    num_kv_heads, head_dim = cache.shape[1], cache.shape[2]
    blocks = cache.view(-1, block_size * num_kv_heads * head_dim).index_select(0, block_ids.reshape(-1))
    return blocks.view(*block_ids.shape[:-1], block_ids.shape[-1] * block_size, num_kv_heads, head_dim)


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
          scale: float) -> torch.Tensor:
    """query [B, Q, H, Dh], key/value [B, K, KVH, Dh] (token-major, as the model has them) -> [B, Q, H, Dh]."""
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        attn_mask=mask, is_causal=mask is None, scale=scale,
        enable_gqa=query.shape[2] != key.shape[2])
    return out.transpose(1, 2)
