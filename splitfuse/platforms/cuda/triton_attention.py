"""Triton paged attention for GPUs: one kernel launch per layer for a whole mixed batch of decodes and chunks.

The host plan (numpy, once per step) cuts every request's query rows into work tiles of at most
``block_q`` rows. A program takes one tile, one KV head and (with split-KV) one range of whole KV
tiles; its M dimension is tile rows x the query heads of its KV head, so each key block is loaded
once for the GQA group. Keys are read through the block table straight from the token-major cache.
With ``num_splits`` > 1 programs write partial outputs and log-sum-exps (base 2) to scratch and a
small reduce kernel combines them (flash-decoding).

CUDA graphs: device metadata (tiles and block tables, one int32 buffer filled by one copy) and the
split scratch live in buffers owned by the backend, grown only when a step needs more; while sizes
do not grow every step reuses the same addresses and strides. A metadata object is valid until the
next ``plan``. ``reserve`` sizes them once for the largest step before graphs are captured and then
freezes them: a later step that would need more is an error, never a silent move under a graph.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

from splitfuse.attention.backend import BatchLayout, strip_padding, token_major_kv_cache_shape

_TILE_FIELDS = 4  # request, first query row, number of rows, position of the first row
_MAX_SPLITS = 16
_MIN_KV_TILES_PER_SPLIT = 4


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_ch,
                     num_kv_heads, head_dim, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    valid_slot = tl.full([BLOCK_H, BLOCK_D], 0, tl.int64) + slot >= 0  # slot -1: a padding row
    mask = (heads < num_kv_heads) & (dims < head_dim) & valid_slot
    key = tl.load(key_ptr + token.to(tl.int64) * stride_kt + heads * stride_kh + dims, mask=mask)
    value = tl.load(value_ptr + token.to(tl.int64) * stride_vt + heads * stride_vh + dims, mask=mask)
    cache_offset = slot * stride_ct + heads * stride_ch + dims
    tl.store(key_cache_ptr + cache_offset, key.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + cache_offset, value.to(value_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _attention_kernel(out_ptr, query_ptr, key_cache_ptr, value_cache_ptr, tiles_ptr, block_tables_ptr,
                      partial_out_ptr, partial_lse_ptr,
                      stride_qt, stride_qh, stride_ot, stride_oh, stride_ct, stride_ch, stride_bt,
                      stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
                      qk_scale, window, head_dim,
                      GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
                      HAS_WINDOW: tl.constexpr, FP32_DOT: tl.constexpr):
    tile, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    request = tl.load(tiles_ptr + tile * 4)
    first_row = tl.load(tiles_ptr + tile * 4 + 1)
    num_rows = tl.load(tiles_ptr + tile * 4 + 2)
    first_pos = tl.load(tiles_ptr + tile * 4 + 3)
    offs_m = tl.arange(0, BLOCK_Q * GROUP_P)
    row = offs_m // GROUP_P
    head = kv_head * GROUP + offs_m % GROUP_P
    row_valid = (row < num_rows) & (offs_m % GROUP_P < GROUP)
    q_pos = first_pos + row
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < head_dim
    q_mask = row_valid[:, None] & dim_valid[None, :]
    q_offset = (first_row + row).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    query = tl.load(query_ptr + q_offset, mask=q_mask, other=0.0)

    kv_end = first_pos + num_rows  # keys 0 .. kv_end - 1; 0 for a context_len-0 padding row
    kv_begin = 0
    if HAS_WINDOW:
        kv_begin = tl.maximum(first_pos - window + 1, 0)
    tile_begin = kv_begin // BLOCK_N
    tile_end = tl.maximum((kv_end + BLOCK_N - 1) // BLOCK_N, tile_begin)
    if NUM_SPLITS > 1:
        per_split = (tile_end - tile_begin + NUM_SPLITS - 1) // NUM_SPLITS
        tile_begin = tl.minimum(tile_begin + split * per_split, tile_end)
        tile_end = tl.minimum(tile_begin + per_split, tile_end)

    m_i = tl.full([BLOCK_Q * GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_P], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_P, BLOCK_D], tl.float32)
    for kv_tile in range(tile_begin, tile_end):
        offs_n = kv_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_valid = offs_n < kv_end
        block = tl.load(block_tables_ptr + request * stride_bt + offs_n // PAGE_SIZE, mask=n_valid, other=0)
        slot = block.to(tl.int64) * PAGE_SIZE + offs_n % PAGE_SIZE
        kv_offset = slot[:, None] * stride_ct + kv_head * stride_ch + dims[None, :]
        kv_mask = n_valid[:, None] & dim_valid[None, :]
        key = tl.load(key_cache_ptr + kv_offset, mask=kv_mask, other=0.0)
        value = tl.load(value_cache_ptr + kv_offset, mask=kv_mask, other=0.0)
        scores = _dot(query, tl.trans(key), FP32_DOT) * qk_scale
        allowed = (offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :]
        if HAS_WINDOW:
            allowed &= offs_n[None, :] > q_pos[:, None] - window
        scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(value.dtype), value, FP32_DOT)
        m_i = m_new

    result = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no visible key: a zero row
    token = (first_row + row).to(tl.int64)
    if NUM_SPLITS == 1:
        out_offset = token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + out_offset, result.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        part_offset = split * stride_ps + token[:, None] * stride_pt + head[:, None] * stride_ph + dims[None, :]
        tl.store(partial_out_ptr + part_offset, result, mask=q_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(partial_lse_ptr + split * stride_ls + token * stride_lt + head, lse, mask=row_valid)


@triton.jit
def _reduce_splits_kernel(out_ptr, partial_out_ptr, partial_lse_ptr, stride_ot, stride_oh,
                          stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, head_dim,
                          NUM_SPLITS: tl.constexpr, SPLITS_P: tl.constexpr, BLOCK_D: tl.constexpr):
    token, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    splits = tl.arange(0, SPLITS_P)
    dims = tl.arange(0, BLOCK_D)
    lse = tl.load(partial_lse_ptr + splits * stride_ls + token * stride_lt + head, mask=splits < NUM_SPLITS,
                  other=float("-inf"))
    top = tl.max(lse, 0)
    weight = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # all -inf: a zero row
    mask = (splits[:, None] < NUM_SPLITS) & (dims[None, :] < head_dim)
    parts = tl.load(partial_out_ptr + splits[:, None] * stride_ps + token * stride_pt + head * stride_ph
                    + dims[None, :], mask=mask, other=0.0)
    total = tl.sum(weight, 0)
    result = tl.sum(parts * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, result.to(out_ptr.dtype.element_ty),
             mask=dims < head_dim)


@dataclass
class TritonAttentionMetadata:
    slot_mapping: torch.Tensor
    block_size: int
    num_tiles: int
    num_splits: int
    tiles: torch.Tensor         # [num_tiles, 4] int32 view of the backend's persistent buffer
    block_tables: torch.Tensor  # [request capacity, width capacity] int32 view of the same buffer


class TritonAttentionBackend:
    """Serves CUDA tensors in bf16, fp16 or fp32 (and CPU tensors under TRITON_INTERPRET=1, for tests).

    ``num_kv_heads`` only sizes the split-KV heuristic (programs = tiles x KV heads)."""

    graph_safe = True  # step metadata at fixed addresses (platforms/cuda/graphs.py)

    def __init__(self, device: torch.device, *, num_kv_heads: int = 8, block_q: int = 16, block_n: int = 64,
                 num_sms: Optional[int] = None) -> None:
        self.device = device
        self.num_kv_heads, self.block_q, self.block_n = num_kv_heads, block_q, block_n
        self._num_sms = num_sms  # None: the device's, read at the first plan (building touches no device)
        # The interpreter runs tl.dot in numpy, which has no bf16: upcast there only (decided once).
        self._fp32_dot_in_interpreter = os.environ.get("TRITON_INTERPRET") == "1"
        self._host = np.zeros(0, dtype=np.int32)
        # Device buffers come with the first plan (until then empty host placeholders: building touches no device).
        self._buffer = torch.zeros(0, dtype=torch.int32)
        self._tile_capacity = self._request_capacity = self._width_capacity = 0
        self._partial_out = torch.zeros(0, dtype=torch.float32)
        self._partial_lse = torch.zeros(0, dtype=torch.float32)
        self._frozen = False  # after reserve: buffers never move again

    def reserve(self, max_num_tokens: int, max_num_reqs: int, max_blocks_per_request: int, num_heads: int,
                head_dim: int) -> None:
        """Buffers for every step up to these sizes, then frozen (before CUDA graphs are captured).

        A step of T tokens over R requests has at most T / block_q + R tiles; splits happen only while
        tiles x KV heads < SMs, so the scratch needs at most that many tiles' rows (or a graph's rows)."""
        self._ensure_capacity(-(-max_num_tokens // self.block_q) + max_num_reqs, max_num_reqs, max_blocks_per_request)
        split_rows = max(max_num_reqs, -(-self.num_sms // max(self.num_kv_heads, 1)) * self.block_q)
        self._scratch(_MAX_SPLITS, min(split_rows, max_num_tokens), num_heads, head_dim)
        self._frozen = True

    def graph_num_splits(self, batch_size: int, max_context_tokens: int) -> int:
        """The fixed split count of a captured decode graph of ``batch_size`` rows (each row's split ranges
        follow its own context length on the device, so one count serves every length)."""
        return self._choose_splits(batch_size, max_context_tokens)

    @property
    def num_sms(self) -> int:
        if self._num_sms is None:
            self._num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                             if self.device.type == "cuda" else 132)
        return self._num_sms

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return token_major_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)

    def plan(self, layout: BatchLayout, sliding_windows: tuple[Optional[int], ...],
             num_splits: Optional[int] = None) -> TritonAttentionMetadata:
        """``num_splits`` overrides the split-KV heuristic (tests; CUDA graphs need a fixed value)."""
        tiles = self._tiles(layout)
        if num_splits is None:
            num_splits = self._choose_splits(len(tiles), int(layout.context_lens.max(initial=0)))
        self._ensure_capacity(max(1, len(tiles)), *(max(1, n) for n in layout.block_tables.shape))
        tile_words = self._tile_capacity * _TILE_FIELDS
        self._host[:tiles.size] = tiles.reshape(-1)
        num_reqs, width = layout.block_tables.shape
        tables = self._host[tile_words:].reshape(self._request_capacity, self._width_capacity)
        tables[:num_reqs, :width] = layout.block_tables
        used = tile_words + num_reqs * self._width_capacity
        self._buffer[:used].copy_(torch.from_numpy(self._host[:used]))  # the step's one host-to-device copy
        return TritonAttentionMetadata(
            layout.slot_mapping, layout.block_size, len(tiles), num_splits,
            self._buffer[:tile_words].view(self._tile_capacity, _TILE_FIELDS)[:len(tiles)],
            self._buffer[tile_words:].view(self._request_capacity, self._width_capacity))

    def _tiles(self, layout: BatchLayout) -> np.ndarray:
        """[num_tiles, 4]: query_lens [1, 20], block_q 16 -> rows (0, 0, 1, ..), (1, 1, 16, ..), (1, 17, 4, ..)."""
        query_lens = layout.query_lens.astype(np.int64)
        per_request = -(-query_lens // self.block_q)
        request = np.repeat(np.arange(len(query_lens)), per_request)
        first_tile = np.cumsum(per_request) - per_request
        offset = (np.arange(len(request)) - first_tile[request]) * self.block_q
        num_rows = np.minimum(self.block_q, query_lens[request] - offset)
        first_row = layout.query_start_loc[request] + offset
        first_pos = layout.context_lens[request] - query_lens[request] + offset
        return np.stack([request, first_row, num_rows, first_pos], axis=1).astype(np.int32)

    def _choose_splits(self, num_tiles: int, max_context_tokens: int) -> int:
        programs = max(num_tiles * self.num_kv_heads, 1)
        max_kv_tiles = -(-max_context_tokens // self.block_n)
        if programs >= self.num_sms or max_kv_tiles < 2 * _MIN_KV_TILES_PER_SPLIT:
            return 1
        return max(1, min(_MAX_SPLITS, -(-self.num_sms // programs), max_kv_tiles // _MIN_KV_TILES_PER_SPLIT))

    def _ensure_capacity(self, num_tiles: int, num_reqs: int, width: int) -> None:
        if (num_tiles <= self._tile_capacity and num_reqs <= self._request_capacity
                and width <= self._width_capacity):
            return
        if self._frozen:
            raise ValueError(f"a step of {num_tiles} attention tiles, {num_reqs} requests x {width} blocks passes "
                             f"the sizes reserved for CUDA graphs ({self._tile_capacity}, {self._request_capacity} "
                             f"x {self._width_capacity})")
        grow = lambda need, have: max(have, 1 << max(need - 1, 0).bit_length())  # noqa: E731
        self._tile_capacity = grow(num_tiles, self._tile_capacity)
        self._request_capacity = grow(num_reqs, self._request_capacity)
        self._width_capacity = grow(width, self._width_capacity)
        size = self._tile_capacity * _TILE_FIELDS + self._request_capacity * self._width_capacity
        self._host = np.zeros(size, dtype=np.int32)
        self._buffer = torch.zeros(size, dtype=torch.int32, device=self.device)

    def _scratch(self, num_splits: int, num_tokens: int, num_heads: int, head_dim: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = self._partial_out, self._partial_lse
        if (out.dim() != 4 or out.shape[0] < num_splits or out.shape[1] < num_tokens
                or out.shape[2:] != (num_heads, head_dim)):
            if self._frozen:
                raise ValueError(f"split-KV scratch for {num_splits} splits x {num_tokens} rows passes what was "
                                 "reserved for CUDA graphs")
            splits = max(num_splits, out.shape[0] if out.dim() == 4 else 0)
            tokens = max(1 << max(num_tokens - 1, 0).bit_length(), out.shape[1] if out.dim() == 4 else 0)
            self._partial_out = torch.empty(splits, tokens, num_heads, head_dim, device=self.device)
            self._partial_lse = torch.empty(splits, tokens, num_heads, device=self.device)
        return self._partial_out, self._partial_lse

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], metadata: TritonAttentionMetadata, *,
                scale: float, sliding_window: Optional[int]) -> torch.Tensor:
        key_cache, value_cache = kv_cache
        num_tokens = metadata.slot_mapping.shape[0]
        key, value, output = strip_padding(query, key, value, num_tokens)
        for tensor in (query, key, value):
            assert tensor.stride(2) == 1, "each head's values must be contiguous"
        num_heads, head_dim = query.shape[1], query.shape[2]
        num_kv_heads = key_cache.shape[1]
        block_d = max(16, triton.next_power_of_2(head_dim))
        if num_tokens:
            _write_kv_kernel[(num_tokens,)](
                key, value, key_cache, value_cache, metadata.slot_mapping,
                key.stride(0), key.stride(1), value.stride(0), value.stride(1),
                key_cache.stride(0), key_cache.stride(1), num_kv_heads, head_dim,
                BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=block_d)
        if metadata.num_tiles == 0:
            return output
        group = num_heads // num_kv_heads
        group_p = triton.next_power_of_2(group)
        splits = metadata.num_splits
        partial_out, partial_lse = self._scratch(splits, num_tokens, num_heads, head_dim) if splits > 1 else (
            output, output)  # unused when not split
        pstride = partial_out.stride() if splits > 1 else (0, 0, 0, 0)
        lstride = partial_lse.stride() if splits > 1 else (0, 0, 0)
        rows_m = self.block_q * group_p
        _attention_kernel[(metadata.num_tiles, num_kv_heads, splits)](
            output, query, key_cache, value_cache, metadata.tiles, metadata.block_tables,
            partial_out, partial_lse,
            query.stride(0), query.stride(1), output.stride(0), output.stride(1),
            key_cache.stride(0), key_cache.stride(1), metadata.block_tables.stride(0),
            pstride[0], pstride[1], pstride[2], lstride[0], lstride[1],
            scale * 1.4426950408889634, sliding_window or 0, head_dim,
            GROUP=group, GROUP_P=group_p, BLOCK_Q=self.block_q, BLOCK_N=self.block_n, BLOCK_D=block_d,
            PAGE_SIZE=metadata.block_size, NUM_SPLITS=splits, HAS_WINDOW=sliding_window is not None,
            FP32_DOT=self._fp32_dot_in_interpreter or query.dtype == torch.float32,
            num_warps=4 if rows_m <= 64 else 8)
        if splits > 1:
            _reduce_splits_kernel[(num_tokens, num_heads)](
                output, partial_out, partial_lse, output.stride(0), output.stride(1),
                pstride[0], pstride[1], pstride[2], lstride[0], lstride[1], head_dim,
                NUM_SPLITS=splits, SPLITS_P=triton.next_power_of_2(splits), BLOCK_D=block_d)
        return output
