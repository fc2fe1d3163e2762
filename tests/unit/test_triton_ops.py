"""The Triton ops (platforms/cuda/triton_ops.py) against the torch ops they replace (platforms/ops.py).

Without CUDA the kernels run under the Triton interpreter on CPU tensors. Tolerances are in units in
the last place (ulps) of the result's dtype, each stated where the two sides round differently.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: it decides when it decorates a kernel

pytest.importorskip("triton")

from splitfuse.platforms import ops as torch_ops  # noqa: E402
from splitfuse.platforms.cuda import triton_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# fp32: the sum of squares in another order moves the inverse rms by an ulp or two (each side is within
# about 2 ulps of the exact value), so each element moves by that relative error, not a fixed ulp count.
RMS_NORM_FP32_RELATIVE_ERROR = 4 * torch.finfo(torch.float32).eps
SILU_FP32_ULPS = 8
# Same fp32 ops as the torch op; only a GPU may fuse a multiply-add (one rounding fewer), flipping a cast.
ROTARY_ULPS = 1 if DEVICE == "cuda" else 0


def ulps_apart(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest |actual - expected| in ulps of expected's dtype (an ulp of a tiny value: the smallest normal's)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    finfo = torch.finfo(expected.dtype)
    expected64 = expected.double()
    _, exponent = torch.frexp(expected64)  # |e| = m * 2**exponent, m in [0.5, 1)
    min_exponent = torch.frexp(torch.tensor(finfo.tiny, dtype=torch.float64))[1]
    ulp = finfo.eps * torch.ldexp(torch.ones_like(expected64), torch.maximum(exponent, min_exponent) - 1)
    return ((actual.double() - expected64).abs() / ulp).max().item() if expected.numel() else 0.0


def assert_rms_norm_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """bf16/fp16: both sides cast the fp32 normalized value, then scale in the dtype, so the fp32
    difference can flip a cast by one ulp at most; fp32: see RMS_NORM_FP32_RELATIVE_ERROR."""
    if expected.dtype != torch.float32:
        assert ulps_apart(actual, expected) <= 1
        return
    relative_error = (actual.double() - expected.double()).abs() / expected.double().abs().clamp_min(1e-30)
    assert relative_error.max().item() <= RMS_NORM_FP32_RELATIVE_ERROR


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 576), (7, 100), (33, 576)])
def test_rms_norm_matches_torch(dtype: torch.dtype, rows: int, hidden: int) -> None:
    x = randn(rows, hidden, dtype=dtype, seed=rows)
    weight = randn(hidden, dtype=dtype, seed=hidden)
    x_before = x.clone()
    out = triton_ops.rms_norm(x, weight, 1e-6)
    assert_rms_norm_close(out, torch_ops.torch_rms_norm(x, weight, 1e-6))
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 100), (7, 576), (33, 100)])
def test_rms_norm_with_residual_fuses_the_add_and_writes_no_input(dtype: torch.dtype, rows: int,
                                                                   hidden: int) -> None:
    x = randn(rows, hidden, dtype=dtype, seed=1)
    residual = randn(rows, hidden, dtype=dtype, seed=2)
    weight = randn(hidden, dtype=dtype, seed=3)
    x_before, residual_before = x.clone(), residual.clone()
    out, new_residual = triton_ops.rms_norm(x, weight, 1e-5, residual)
    expected_out, expected_residual = torch_ops.torch_rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(new_residual, expected_residual)  # one rounding of the fp32 sum on both sides
    assert_rms_norm_close(out, expected_out)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def test_rms_norm_reads_strided_rows() -> None:
    wide = randn(7, 700, dtype=torch.bfloat16, seed=4)
    x, residual = wide[:, :576], wide[:, 100:676]  # rows of stride 700
    weight = randn(576, dtype=torch.bfloat16, seed=5)
    out, new_residual = triton_ops.rms_norm(x, weight, 1e-6, residual)
    expected_out, expected_residual = torch_ops.torch_rms_norm(x, weight, 1e-6, residual)
    assert torch.equal(new_residual, expected_residual)
    assert ulps_apart(out, expected_out) <= 1


def fused_qkv_views(tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """query [T, H, D] and key [T, KVH, D] as the model makes them: strided views of one qkv output."""
    qkv = randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, seed=tokens)
    query, key, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return query.view(tokens, num_heads, head_dim), key.view(tokens, num_kv_heads, head_dim)


def rope_tables(max_position: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
    return freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(9, 3, 64), (4, 2, 80)])
def test_rotary_matches_torch_on_fused_qkv_views(dtype: torch.dtype, tokens: int, num_heads: int,
                                                 num_kv_heads: int, head_dim: int) -> None:
    query, key = fused_qkv_views(tokens, num_heads, num_kv_heads, head_dim, dtype)
    fused_width = (num_heads + 2 * num_kv_heads) * head_dim
    assert query.stride()[1:] == key.stride()[1:] == (head_dim, 1)
    assert tokens == 1 or query.stride(0) == key.stride(0) == fused_width  # one token: torch normalizes it
    cos, sin = rope_tables(4096, head_dim)
    generator = torch.Generator().manual_seed(tokens)
    positions = torch.randperm(4096, generator=generator)[:tokens].to(DEVICE)  # unsorted
    query_before, key_before = query.clone(), key.clone()
    rotated_query, rotated_key = triton_ops.rotary(positions, query, key, cos, sin)
    expected_query, expected_key = torch_ops.torch_rotary(positions, query, key, cos, sin)
    assert ulps_apart(rotated_query, expected_query) <= ROTARY_ULPS
    assert ulps_apart(rotated_key, expected_key) <= ROTARY_ULPS
    assert torch.equal(query, query_before) and torch.equal(key, key_before)  # copies, as the torch op


def test_rotary_loops_over_heads_in_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_ops, "ROTARY_TILE", 64)  # head_dim 64: 2 heads a tile, 9 heads in 5 tiles
    query, key = fused_qkv_views(5, 9, 3, 64, torch.bfloat16)
    cos, sin = rope_tables(64, 64)
    positions = torch.tensor([63, 0, 17, 5, 17], dtype=torch.int32, device=DEVICE)
    rotated_query, rotated_key = triton_ops.rotary(positions, query, key, cos, sin)
    expected_query, expected_key = torch_ops.torch_rotary(positions, query, key, cos, sin)
    assert ulps_apart(rotated_query, expected_query) <= ROTARY_ULPS
    assert ulps_apart(rotated_key, expected_key) <= ROTARY_ULPS


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, intermediate", [(1, 576), (7, 100), (33, 576)])
def test_silu_and_mul_matches_torch(dtype: torch.dtype, rows: int, intermediate: int,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_ops, "SILU_BLOCK", 256)  # 576 columns in 3 blocks, the last one masked
    gate_up = randn(rows, 2 * intermediate, dtype=dtype, seed=rows, scale=4.0)
    out = triton_ops.silu_and_mul(gate_up)
    gate, up = gate_up.double().split(intermediate, dim=-1)
    # The contract: fp32 math, one cast. fp32 itself: exp, add, divide and multiply each round (a GPU's
    # exp and divide are approximate, within 2 ulps).
    exact = (torch.nn.functional.silu(gate) * up).to(dtype)
    assert ulps_apart(out, exact) <= (SILU_FP32_ULPS if dtype == torch.float32 else 1)
    # The torch op rounds silu(gate) to the dtype, then the product: 1 ulp further (fp32: its own roundings),
    # or where silu(gate) is an fp16 subnormal, up to half a subnormal's spacing times |up|.
    finfo = torch.finfo(dtype)
    ulps = SILU_FP32_ULPS if dtype == torch.float32 else 2
    subnormal_error = finfo.tiny * finfo.eps / 2 * up.abs().max().item() if dtype == torch.float16 else 0.0
    torch.testing.assert_close(out, torch_ops.torch_silu_and_mul(gate_up), rtol=ulps * finfo.eps,
                               atol=subnormal_error)


def logits_with_cases(rows: int, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """Random rows, then: a tie, a tie whose later lane holds the smaller index, an all -inf row,
    the max in the last chunk, a row with NaNs (torch.max picks the first NaN)."""
    chunk = triton_ops.ARGMAX_CHUNK
    logits = randn(rows, vocab, dtype=dtype, seed=vocab).cpu()
    logits[0, [3, 10, vocab - 1]] = 50.0  # -> 3
    logits[1, [chunk + 1, 4]] = 50.0  # index 4 (lane 4, first chunk) before chunk + 1 (lane 1) -> 4
    logits[2] = float("-inf")  # -> 0
    logits[3, vocab - 1] = 50.0  # -> vocab - 1, in the last chunk
    logits[4, [vocab - 2, 7]] = float("nan")  # -> 7
    logits[5, 0] = float("-inf")
    return logits.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_argmax_matches_torch_across_chunks(dtype: torch.dtype) -> None:
    vocab = 2 * triton_ops.ARGMAX_CHUNK + 1808  # three chunks, the last one partial
    logits = logits_with_cases(7, vocab, dtype)
    picks = triton_ops.argmax(logits)
    assert picks.dtype == torch.int64
    assert picks[:5].tolist() == [3, 4, 0, vocab - 1, 7]
    assert torch.equal(picks, torch_ops.torch_argmax(logits))


@pytest.mark.parametrize("rows, vocab", [(1, 100), (33, 1000)])
def test_argmax_small_vocabs_and_strided_rows(rows: int, vocab: int) -> None:
    wide = randn(rows, vocab + 24, dtype=torch.bfloat16, seed=rows)
    logits = wide[:, 24:]  # rows of stride vocab + 24
    logits[0, [vocab - 1, vocab // 2]] = 30.0
    picks = triton_ops.argmax(logits)
    assert picks[0].item() == vocab // 2
    assert torch.equal(picks, torch_ops.torch_argmax(logits))


def test_triton_ops_are_these_functions() -> None:
    ops = triton_ops.TRITON_OPS
    assert (ops.rms_norm, ops.rotary, ops.silu_and_mul, ops.argmax) == (
        triton_ops.rms_norm, triton_ops.rotary, triton_ops.silu_and_mul, triton_ops.argmax)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_sizes_on_the_gpu() -> None:
    """Llama-3-8B's shapes in bf16: 2048 tokens, hidden 4096, 32/8 heads of 128, MLP 14336, vocab 128256."""
    dtype, tokens = torch.bfloat16, 2048
    x, residual = randn(tokens, 4096, dtype=dtype, seed=1), randn(tokens, 4096, dtype=dtype, seed=2)
    weight = randn(4096, dtype=dtype, seed=3)
    out, new_residual = triton_ops.rms_norm(x, weight, 1e-5, residual)
    expected_out, expected_residual = torch_ops.torch_rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(new_residual, expected_residual) and ulps_apart(out, expected_out) <= 1

    query, key = fused_qkv_views(tokens, 32, 8, 128, dtype)
    cos, sin = rope_tables(131072, 128)
    positions = torch.randint(0, 131072, (tokens,), device=DEVICE)
    for rotated, expected in zip(triton_ops.rotary(positions, query, key, cos, sin),
                                 torch_ops.torch_rotary(positions, query, key, cos, sin)):
        assert ulps_apart(rotated, expected) <= ROTARY_ULPS

    gate_up = randn(tokens, 2 * 14336, dtype=dtype, seed=4, scale=4.0)
    assert ulps_apart(triton_ops.silu_and_mul(gate_up), torch_ops.torch_silu_and_mul(gate_up)) <= 1

    logits = randn(256, 128256, dtype=dtype, seed=5)
    logits[7, -1], logits[8, [5, 128000]] = 100.0, 100.0
    picks = triton_ops.argmax(logits)
    assert picks[7].item() == 128255 and picks[8].item() == 5
    assert torch.equal(picks, torch_ops.torch_argmax(logits))
