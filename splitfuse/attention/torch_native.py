"""Torch-native paged attention: the reference backend, on CPU and CUDA, built on SDPA.

Decodes (one query token) are batched into one SDPA call over their gathered
context, padded to the longest and masked. Every other request (a prompt chunk)
gets its own SDPA call: a chunk that starts at position 0 attends only to its own
new keys with a plain causal mask; a later chunk gathers its cached context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from splitfuse.attention.backend import BatchLayout


@dataclass
class _ChunkPlan:
    token_start: int
    token_end: int
    context_slots: Optional[torch.Tensor]  # [context_len]; None when the chunk is the whole context
    masks: dict[Optional[int], Optional[torch.Tensor]]  # window -> [q, ctx] bool (None: plain causal)


@dataclass
class TorchNativeMetadata:
    slot_mapping: torch.Tensor
    num_decodes: int
    decode_slots: Optional[torch.Tensor] = None   # [num_decodes, max_context]
    decode_masks: dict[Optional[int], torch.Tensor] = field(default_factory=dict)  # [D, 1, 1, max_ctx]
    chunks: list[_ChunkPlan] = field(default_factory=list)


def _context_slots(block_table: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    # block_table [.., blocks], positions [.., L] -> slot of each position: [7, 3], pos 17, bs 16 -> 3*16 + 1
    block_index = positions // block_size
    return np.take_along_axis(block_table, block_index, axis=-1) * block_size + positions % block_size


class TorchNativeBackend:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def plan(self, layout: BatchLayout, sliding_windows: tuple[Optional[int], ...]) -> TorchNativeMetadata:
        metadata = TorchNativeMetadata(slot_mapping=layout.slot_mapping, num_decodes=layout.num_decodes)
        if layout.num_decodes:
            self._plan_decodes(layout, sliding_windows, metadata)
        for i in range(layout.num_decodes, len(layout.query_lens)):
            metadata.chunks.append(self._plan_chunk(layout, i, sliding_windows))
        return metadata

    def _plan_decodes(self, layout: BatchLayout, windows: tuple[Optional[int], ...],
                      metadata: TorchNativeMetadata) -> None:
        num = layout.num_decodes
        context_lens = layout.context_lens[:num]
        max_context = int(context_lens.max())
        positions = np.broadcast_to(np.arange(max_context), (num, max_context))
        tables = layout.block_tables[:num]
        # Padding positions index block 0 of the table row: a valid slot, masked out below.
        clipped = np.minimum(positions, (context_lens[:, None] - 1))
        slots = _context_slots(tables, clipped, layout.block_size)
        metadata.decode_slots = torch.from_numpy(slots).to(self.device)
        for window in windows:
            valid = positions < context_lens[:, None]
            if window is not None:
                valid &= positions > (context_lens[:, None] - 1 - window)
            metadata.decode_masks[window] = torch.from_numpy(valid[:, None, None, :].copy()).to(self.device)

    def _plan_chunk(self, layout: BatchLayout, i: int, windows: tuple[Optional[int], ...]) -> _ChunkPlan:
        query_len = int(layout.query_lens[i])
        context_len = int(layout.context_lens[i])
        start = context_len - query_len
        plan = _ChunkPlan(int(layout.query_start_loc[i]), int(layout.query_start_loc[i + 1]), None, {})
        if start > 0:
            slots = _context_slots(layout.block_tables[i], np.arange(context_len), layout.block_size)
            plan.context_slots = torch.from_numpy(slots).to(self.device)
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
        key_cache.index_copy_(0, metadata.slot_mapping, key)
        value_cache.index_copy_(0, metadata.slot_mapping, value)
        output = torch.empty_like(query)
        num_decodes = metadata.num_decodes
        if num_decodes:
            output[:num_decodes] = self._decode(query[:num_decodes], key_cache, value_cache, metadata,
                                                scale, sliding_window)
        for chunk in metadata.chunks:
            rows = slice(chunk.token_start, chunk.token_end)
            if chunk.context_slots is None:
                chunk_key, chunk_value = key[rows], value[rows]
            else:
                chunk_key, chunk_value = key_cache[chunk.context_slots], value_cache[chunk.context_slots]
            output[rows] = _sdpa(query[rows].unsqueeze(0), chunk_key.unsqueeze(0), chunk_value.unsqueeze(0),
                                 chunk.masks[sliding_window], scale).squeeze(0)
        return output

    @staticmethod
    def _decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                metadata: TorchNativeMetadata, scale: float, sliding_window: Optional[int]) -> torch.Tensor:
        keys = key_cache[metadata.decode_slots]      # [D, L, KVH, Dh]
        values = value_cache[metadata.decode_slots]
        return _sdpa(query.unsqueeze(1), keys, values, metadata.decode_masks[sliding_window], scale).squeeze(1)


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
          scale: float) -> torch.Tensor:
    """query [B, Q, H, Dh], key/value [B, K, KVH, Dh] (token-major, as the model has them) -> [B, Q, H, Dh]."""
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        attn_mask=mask, is_causal=mask is None, scale=scale,
        enable_gqa=query.shape[2] != key.shape[2])
    return out.transpose(1, 2)
