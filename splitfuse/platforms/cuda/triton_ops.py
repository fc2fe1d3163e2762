"""The layers' ops (``Ops``) as fused Triton kernels for GPUs, each one launch per call.

Every op keeps the torch op's contract (``platforms/ops.py``) and its rounding: math in fp32, a cast
to the model dtype where the torch op casts. Each returns new tensors, never writing its inputs, as
the torch ops do (the C kernels rotate q/k and add the residual in place; nothing here relies on that).
Only this module imports triton, so CPU installs need not have it. Under ``TRITON_INTERPRET=1`` the
same kernels run on CPU tensors, which is how the unit tests check them.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from splitfuse.platforms.ops import Ops

# argmax reads a row in chunks of at most this many logits (a 256k vocab: 64 chunks).
ARGMAX_CHUNK = 4096
# rotary rotates a token's heads in tiles of at most this many (head, pair) elements.
ROTARY_TILE = 4096
SILU_BLOCK = 1024
# The largest int32: "no index yet" in argmax's lanes (a vocab is far smaller).
_NO_INDEX = 2**31 - 1


@triton.jit
def _cast(x, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    """x (fp32) -> dtype, rounding to nearest even. The interpreter truncates fp32 -> bf16 (GPUs round),
    so there ``ROUND_BF16`` rounds the fp32 bits by hand first and the truncation is then exact."""
    if ROUND_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def _num_warps(block: int) -> int:
    """Enough warps that each thread holds a few elements of a row: 1024 -> 4, 8192 -> 16."""
    return max(1, min(16, block // 256))


@triton.jit
def _rms_norm_kernel(out_ptr, residual_out_ptr, x_ptr, residual_ptr, weight_ptr, hidden, x_row_stride,
                     residual_row_stride, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                     ROUND_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        # x + residual in the model dtype (one rounding of the fp32 sum, as torch adds).
        x = _cast(x.to(tl.float32) + residual.to(tl.float32), out_ptr.dtype.element_ty, ROUND_BF16)
        tl.store(residual_out_ptr + row * hidden + cols, x, mask=mask)
    x = x.to(tl.float32)
    inverse_rms = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / hidden + eps)
    normed = _cast(x * inverse_rms, out_ptr.dtype.element_ty, ROUND_BF16)  # cast before the weight, as torch_rms_norm
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    # weight * normed in the model dtype: the fp32 product of two bf16/fp16 values is exact, so one rounding.
    out = weight.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, _cast(out, out_ptr.dtype.element_ty, ROUND_BF16), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x) over the last dim; with a residual, (norm(x + residual), x + residual), the add fused."""
    hidden = x.shape[-1]
    rows_x = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows_residual = rows_x if residual is None else _rows(residual)
    residual_out = out if residual is None else torch.empty_like(out)
    if rows_x.shape[0] == 0:
        return out if residual is None else (out, residual_out)
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(rows_x.shape[0],)](
        out, residual_out, rows_x, rows_residual, weight, hidden, rows_x.stride(0), rows_residual.stride(0), eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, ROUND_BF16=_INTERPRETED, num_warps=_num_warps(block))
    return out if residual is None else (out, residual_out)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as 2-D rows of unit stride, a view where it can be (hidden states with strided rows stay views)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


@triton.jit
def _rotate_heads(out_ptr, x_ptr, x_token_stride, x_head_stride, x_dim_stride, num_heads, token, cos, sin,
                  half, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, ROUND_BF16: tl.constexpr):
    """One token's heads, rotate-half: out = (x1 cos - x2 sin, x2 cos + x1 sin); out is contiguous."""
    pairs = tl.arange(0, BLOCK_HALF)
    for head_start in range(0, num_heads, BLOCK_HEADS):
        heads = head_start + tl.arange(0, BLOCK_HEADS)
        mask = (heads[:, None] < num_heads) & (pairs[None, :] < half)
        first = x_ptr + token * x_token_stride + heads[:, None] * x_head_stride + pairs[None, :] * x_dim_stride
        x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(first + half * x_dim_stride, mask=mask, other=0.0).to(tl.float32)
        out_first = out_ptr + (token * num_heads + heads[:, None]) * (2 * half) + pairs[None, :]
        tl.store(out_first, _cast(x1 * cos - x2 * sin, out_ptr.dtype.element_ty, ROUND_BF16), mask=mask)
        tl.store(out_first + half, _cast(x2 * cos + x1 * sin, out_ptr.dtype.element_ty, ROUND_BF16), mask=mask)


@triton.jit
def _rotary_kernel(query_out_ptr, key_out_ptr, query_ptr, key_ptr, positions_ptr, cos_ptr, sin_ptr,
                   num_heads, num_kv_heads, half, query_token_stride, query_head_stride, query_dim_stride,
                   key_token_stride, key_head_stride, key_dim_stride, cos_row_stride, sin_row_stride,
                   BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, ROUND_BF16: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    pairs = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + position * cos_row_stride + pairs, mask=pairs < half, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + position * sin_row_stride + pairs, mask=pairs < half, other=0.0).to(tl.float32)
    cos, sin = cos[None, :], sin[None, :]
    _rotate_heads(query_out_ptr, query_ptr, query_token_stride, query_head_stride, query_dim_stride, num_heads,
                  token, cos, sin, half, BLOCK_HEADS, BLOCK_HALF, ROUND_BF16)
    _rotate_heads(key_out_ptr, key_ptr, key_token_stride, key_head_stride, key_dim_stride, num_kv_heads,
                  token, cos, sin, half, BLOCK_HEADS, BLOCK_HALF, ROUND_BF16)


def rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T]; query [T, H, D], key [T, KVH, D], any strides (e.g. views of the fused qkv output);
    cos, sin [max_position, D / 2] -> rotated contiguous copies of query and key, one launch for both."""
    tokens, num_heads, head_dim = query.shape
    half = head_dim // 2
    query_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    key_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    if tokens == 0:
        return query_out, key_out
    cos, sin = _unit_stride_rows(cos), _unit_stride_rows(sin)
    block_half = triton.next_power_of_2(half)
    block_heads = min(triton.next_power_of_2(max(num_heads, key.shape[1])), max(1, ROTARY_TILE // block_half))
    _rotary_kernel[(tokens,)](
        query_out, key_out, query, key, positions, cos, sin, num_heads, key.shape[1], half, *query.stride(),
        *key.stride(), cos.stride(0), sin.stride(0), BLOCK_HEADS=block_heads, BLOCK_HALF=block_half,
        ROUND_BF16=_INTERPRETED, num_warps=_num_warps(block_heads * block_half))
    return query_out, key_out


def _unit_stride_rows(table: torch.Tensor) -> torch.Tensor:
    return table if table.stride(-1) == 1 else table.contiguous()


@triton.jit
def _silu_and_mul_kernel(out_ptr, gate_up_ptr, intermediate, gate_up_row_stride, BLOCK: tl.constexpr,
                         ROUND_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(gate_up_ptr + row * gate_up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * gate_up_row_stride + intermediate + cols, mask=mask, other=0.0)
    out = gate / (1.0 + tl.exp(-gate)) * up.to(tl.float32)
    tl.store(out_ptr + row * intermediate + cols, _cast(out, out_ptr.dtype.element_ty, ROUND_BF16), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2I] -> silu(gate) * up [..., I], in fp32 and cast once (torch rounds silu, then the product)."""
    intermediate = gate_up.shape[-1] // 2
    rows = _rows(gate_up)
    out = torch.empty(*gate_up.shape[:-1], intermediate, dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0] == 0 or intermediate == 0:
        return out
    block = min(SILU_BLOCK, triton.next_power_of_2(intermediate))
    grid = (rows.shape[0], triton.cdiv(intermediate, block))
    _silu_and_mul_kernel[grid](out, rows, intermediate, rows.stride(0), BLOCK=block, ROUND_BF16=_INTERPRETED,
                                   num_warps=_num_warps(block))
    return out


@triton.jit
def _argmax_kernel(out_ptr, logits_ptr, vocab, row_stride, NO_INDEX: tl.constexpr, BLOCK: tl.constexpr):
    """Each lane keeps the first index of its largest value (a NaN beats any number, as in torch.max);
    the row's pick is then the smallest index among the lanes holding the row's max."""
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = tl.full([BLOCK], NO_INDEX, tl.int32)
    for start in range(0, vocab, BLOCK):
        index = start + lanes
        valid = index < vocab
        # fp32 as torch_argmax compares (exact for bf16/fp16; fp64 rounds as torch_argmax's .float()).
        value = tl.load(logits_ptr + row * row_stride + index, mask=valid, other=float("-inf")).to(tl.float32)
        # Later chunks win only if strictly larger, so a lane keeps its first index on ties.
        take = valid & ((best_index == NO_INDEX) | (value > best) | ((value != value) & (best == best)))
        best = tl.where(take, value, best)
        best_index = tl.where(take, index, best_index)
    is_nan = best != best
    any_nan = tl.max(is_nan.to(tl.int32), axis=0) > 0
    row_max = tl.max(tl.where(is_nan, float("-inf"), best), axis=0)
    holds_max = tl.where(any_nan, is_nan, best == row_max) & (best_index != NO_INDEX)
    tl.store(out_ptr + row, tl.min(tl.where(holds_max, best_index, NO_INDEX), axis=0).to(tl.int64))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [rows, vocab] (rows may be strided), any float dtype -> int64 [rows], the first index of the max."""
    rows = _rows(logits)
    out = torch.empty(rows.shape[0], dtype=torch.int64, device=logits.device)
    if rows.shape[0] == 0:
        return out
    block = min(ARGMAX_CHUNK, triton.next_power_of_2(rows.shape[1]))
    _argmax_kernel[(rows.shape[0],)](out, rows, rows.shape[1], rows.stride(0), NO_INDEX=_NO_INDEX, BLOCK=block,
                                     num_warps=_num_warps(block))
    return out


# Whether the kernels run under TRITON_INTERPRET=1 (triton decided it when it decorated them).
_INTERPRETED = isinstance(_cast, InterpretedFunction)

TRITON_OPS = Ops(rms_norm=rms_norm, rotary=rotary, silu_and_mul=silu_and_mul, argmax=argmax)
