"""The fused C ops equal the torch code they replace: to the last bit in bf16, to fp32 rounding in fp32."""

import pytest
import torch
import torch.nn.functional as F

from splitfuse.layers.norm import RMSNorm
from splitfuse.layers.rotary import RotaryEmbedding
from splitfuse.platforms import resolve_platform
from splitfuse.platforms.cpu.ops import kernel_ops
from splitfuse.platforms.ops import TORCH_OPS, rotate, torch_rms_norm

CPU = torch.device("cpu")
KERNELS = resolve_platform(CPU, torch.bfloat16).kernels
pytestmark = pytest.mark.skipif(KERNELS is None, reason="no C compiler for the CPU kernels")

DTYPES = [torch.float32, torch.bfloat16]


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    if actual.dtype == torch.bfloat16:
        # Same roundings at the same points; fp32 sums in a different order may still move the
        # last bit of a few values.
        mismatched = (actual != expected).float().mean().item()
        assert mismatched < 0.01, f"{mismatched:.2%} of values differ"
        torch.testing.assert_close(actual, expected, atol=0, rtol=2 ** -7)
    else:
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_and_without_residual(dtype):
    generator = torch.Generator().manual_seed(0)
    norm = RMSNorm(96, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(96, generator=generator).to(dtype)
    wide = torch.randn(7, 200, generator=generator).to(dtype)
    x = wide[:, 10:106]  # strided rows, as a slice of a wider output would be
    residual = torch.randn(7, 96, generator=generator).to(dtype)
    kernels = KERNELS

    assert_matches(kernels.rms_norm(x, norm.weight, norm.eps), torch_rms_norm(x, norm.weight, norm.eps))
    expected_residual = x + residual
    fused_residual = residual.clone()
    out = kernels.rms_norm(x, norm.weight, norm.eps, fused_residual)
    assert torch.equal(fused_residual, expected_residual)  # one add, rounded once: exact
    assert_matches(out, torch_rms_norm(expected_residual, norm.weight, norm.eps))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_on_views_of_the_fused_qkv_output(dtype):
    generator = torch.Generator().manual_seed(1)
    num_heads, num_kv_heads, head_dim = 4, 2, 16
    rotary = RotaryEmbedding(head_dim, max_position=64, theta=10000.0, op=kernel_ops(KERNELS).rotary)
    qkv = torch.randn(5, (num_heads + 2 * num_kv_heads) * head_dim, generator=generator).to(dtype)
    positions = torch.tensor([0, 3, 9, 63, 17])
    query = qkv[:, :num_heads * head_dim].view(5, num_heads, head_dim)
    key = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(5, num_kv_heads, head_dim)
    value_before = qkv[:, (num_heads + num_kv_heads) * head_dim:].clone()
    # The torch path (what runs without the kernels) on copies:
    cos, sin = rotary.cos[positions].unsqueeze(1), rotary.sin[positions].unsqueeze(1)
    expected_query, expected_key = rotate(query.clone(), cos, sin), rotate(key.clone(), cos, sin)

    rotated_query, rotated_key = rotary(positions, query, key)

    assert rotated_query.data_ptr() == query.data_ptr()  # in place
    assert_matches(rotated_query, expected_query)
    assert_matches(rotated_key, expected_key)
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim:], value_before)  # value untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    gate_up = (torch.randn(6, 2 * 40, generator=torch.Generator().manual_seed(2)) * 4).to(dtype)
    gate, up = gate_up.split(40, dim=-1)
    assert_matches(KERNELS.silu_and_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_stays_finite_for_very_negative_gates(dtype):
    # Under -ffast-math an overflowing exp(-gate) once made silu NaN for every gate below -88.
    gate = torch.tensor([[-1e5, -1e3, -200.0, -100.0, -88.5, -87.0, 1e3, 3.0] * 4], dtype=dtype)
    up = torch.full_like(gate, 2.0)
    out = KERNELS.silu_and_mul(torch.cat([gate, up], dim=1))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), (F.silu(gate.float()) * 2).to(dtype).float(), atol=1e-30, rtol=2 ** -7)


def test_write_kv_cache_puts_each_row_at_its_slot():
    key_cache, value_cache = torch.zeros(10, 2, 4), torch.zeros(10, 2, 4)
    kv = torch.arange(3 * 16, dtype=torch.float32).view(3, 16)  # key and value as views of one output
    key, value = kv[:, :8].view(3, 2, 4), kv[:, 8:].view(3, 2, 4)
    KERNELS.write_kv_cache(key_cache, value_cache, key, value, torch.tensor([7, 0, 4]))
    assert torch.equal(key_cache[[7, 0, 4]], key) and torch.equal(value_cache[[7, 0, 4]], value)
    untouched = [1, 2, 3, 5, 6, 8, 9]
    assert not key_cache[untouched].any() and not value_cache[untouched].any()
    with pytest.raises(ValueError, match="3 key and 3 value rows for 2 slots"):
        KERNELS.write_kv_cache(key_cache, value_cache, key, value, torch.tensor([7, 0]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_takes_the_first_index_of_the_max(dtype):
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(3)).to(dtype)
    logits[1, [10, 500, 999]] = 50.0  # a tie: the first index wins
    logits[2, 999] = 60.0  # the last column
    logits[3, 0] = 60.0  # the first column
    wide = torch.cat([logits, torch.full((5, 24), 100.0, dtype=dtype)], dim=1)[:, :1000]  # strided rows
    expected = logits.float().max(dim=-1).indices
    assert expected[1:4].tolist() == [10, 999, 0]
    assert torch.equal(KERNELS.argmax(wide), expected)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("SPLITFUSE_DISABLE_CPU_KERNELS", "1")
    platform = resolve_platform(CPU, torch.bfloat16)
    assert platform.kernels is None and platform.ops is TORCH_OPS
