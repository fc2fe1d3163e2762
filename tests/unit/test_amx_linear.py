"""The AMX linear kernel (csrc/amx_linear.c) against fp32 math, over every tail it handles: rows not a
multiple of 16 or 32, more than one 1,024-row block, columns not a multiple of 32, bias, strided rows."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from splitfuse.platforms import resolve_platform
from splitfuse.platforms.cpu.linear import AmxLinear, LinearPacker, PackedLinear

PLATFORM = resolve_platform(torch.device("cpu"), torch.bfloat16)
KERNELS = PLATFORM.kernels
AMX = LinearPacker(amx=KERNELS)  # packs on AMX where the kernel takes the weight, else oneDNN
pytestmark = pytest.mark.skipif(not PLATFORM.uses_amx,
                                reason="no AMX on this CPU (or no C compiler, or SPLITFUSE_DISABLE_AMX is set)")


def expected_linear(x, weight, bias):
    """fp32 math on the same bf16 inputs, rounded once to bf16 as the kernel rounds."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(torch.bfloat16)


@pytest.mark.parametrize("rows, in_features, out_features, bias", [
    (1, 64, 96, False), (7, 32, 40, True), (16, 64, 32, False), (17, 96, 64, True), (33, 64, 200, True),
    (40, 512, 1024, False), (1030, 64, 48, True)])
def test_amx_linear_matches_fp32_math_to_bf16_rounding(rows, in_features, out_features, bias):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
    bias_tensor = torch.randn(out_features, generator=generator).to(torch.bfloat16) if bias else None
    # A view into wider rows: the kernel takes a row stride.
    x = torch.randn(rows, in_features + 32, generator=generator).to(torch.bfloat16)[:, 16:16 + in_features]
    layer = AmxLinear(weight, bias_tensor, KERNELS)
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    # fp32 sums in another order may round to the neighbouring bf16 value, never further.
    torch.testing.assert_close(got.float(), expected_linear(x, weight, bias_tensor).float(), rtol=2 ** -7, atol=1e-3)


def test_a_nan_input_row_gives_a_nan_output_row_and_leaves_the_others_alone():
    weight = torch.randn(64, 32).to(torch.bfloat16)
    x = torch.randn(3, 32).to(torch.bfloat16)
    x[1, 5] = float("nan")
    got = AmxLinear(weight, None, KERNELS)(x)
    assert got[1].isnan().all() and not got[[0, 2]].isnan().any()


def test_packed_weight_is_tiled_for_amx():
    # Tile (pair, half) holds k-pair p of column 32 pair + 16 half + c at [p, c]: W[column, 2p:2p + 2].
    weight = torch.arange(40 * 32, dtype=torch.float32).reshape(40, 32).to(torch.bfloat16)
    packed = KERNELS.pack_amx_weight(weight)
    assert packed.numel() == 64 * 32  # 40 columns padded to 64
    tiles = packed.view(2, 2, 16, 16, 2)  # (column pair, half, k-pair, column, k within the pair)
    assert torch.equal(tiles[0, 0, 3, 5], weight[5, 6:8])
    assert torch.equal(tiles[0, 1, 15, 0], weight[16, 30:32])
    assert torch.equal(tiles[1, 0, 0, 7], weight[39, 0:2])
    assert not tiles[1, 0, :, 8:].any() and not tiles[1, 1].any()  # the padding columns are zero


def test_bad_inputs_are_refused_before_the_kernel_runs():
    layer = AmxLinear(torch.randn(64, 32).to(torch.bfloat16), torch.randn(64).to(torch.bfloat16), KERNELS)
    with pytest.raises(ValueError, match="bf16 rows of unit stride"):
        layer(torch.randn(2, 32))
    with pytest.raises(ValueError, match="bf16 rows of unit stride"):
        layer(torch.randn(32, 2).to(torch.bfloat16).t())
    with pytest.raises(ValueError, match="does not fit 64 x 64"):
        KERNELS.amx_linear(torch.randn(2, 64).to(torch.bfloat16), layer.packed_weight, None, 64)
    with pytest.raises(ValueError, match="fp32 bias of 64 elements"):
        KERNELS.amx_linear(torch.randn(2, 32).to(torch.bfloat16), layer.packed_weight, torch.zeros(64).bfloat16(), 64)


def test_packed_linear_picks_amx_where_the_kernel_takes_the_weight():
    assert isinstance(AMX.pack(torch.randn(48, 64).to(torch.bfloat16), None), AmxLinear)
    assert isinstance(AMX.pack(torch.randn(48, 40).to(torch.bfloat16), None), PackedLinear)  # 40 % 32 != 0
    assert not KERNELS.amx_takes(torch.randn(48, 64))  # fp32
    model = nn.Sequential(nn.Linear(64, 32), nn.Sequential(nn.Linear(32, 8), nn.ReLU()), nn.Linear(8, 4))
    model = model.to(torch.bfloat16)
    x = torch.randn(5, 64).to(torch.bfloat16)
    expected = model(x)
    assert AMX.pack_layers(model) == 3
    assert [type(model[0]), type(model[1][0]), type(model[2])] == [AmxLinear, AmxLinear, PackedLinear]
    torch.testing.assert_close(model(x).float(), expected.float(), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("rows, intermediate, bias",
                         [(1, 16, False), (5, 48, True), (40, 128, False), (1030, 32, True)])
def test_silu_mul_layer_gives_silu_of_gate_times_up_as_the_unfused_bf16_ops_round(rows, intermediate, bias):
    generator = torch.Generator().manual_seed(intermediate)
    weight = torch.randn(2 * intermediate, 64, generator=generator).to(torch.bfloat16)  # [gate; up]
    bias_tensor = torch.randn(2 * intermediate, generator=generator).to(torch.bfloat16) if bias else None
    x = torch.randn(rows, 64, generator=generator).to(torch.bfloat16)
    layer = AmxLinear(weight, bias_tensor, KERNELS, silu_mul=True)
    got = layer(x)
    assert got.shape == (rows, intermediate) and layer.out_features == intermediate
    gate, up = expected_linear(x, weight, bias_tensor).split(intermediate, dim=-1)  # each rounded to bf16
    expected = (F.silu(gate.float()).to(torch.bfloat16).float() * up.float()).to(torch.bfloat16)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2 ** -6, atol=1e-3)
    # Extreme gates: silu(100) * 100 is 10,000 (9,984 in bf16), silu(-100) * -100 is ~4e-40; no NaN.
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    x[0, 0], x[1, 0] = 100.0, -100.0
    unit = torch.zeros(2 * intermediate, 64, dtype=torch.bfloat16)
    unit[:intermediate, 0] = 1.0   # gate = x[:, 0]
    unit[intermediate:, 0] = 1.0   # up = x[:, 0]
    extreme = AmxLinear(unit, None, KERNELS, silu_mul=True)(x).float()
    assert torch.equal(extreme[0], torch.full((intermediate,), 9984.0)) and extreme[1].abs().max() < 1e-30


def test_gate_up_rows_go_in_alternating_blocks_of_16():
    from splitfuse.platforms.cpu.linear import gate_up_order

    assert gate_up_order(32).tolist() == [*range(16), *range(32, 48), *range(16, 32), *range(48, 64)]
    with pytest.raises(ValueError, match="multiple of 16, not 24"):
        AmxLinear(torch.zeros(48, 32, dtype=torch.bfloat16), None, KERNELS, silu_mul=True)
    # Only gate_up_proj layers are fused, and only where the sizes allow it.
    mlp = nn.Module()
    mlp.gate_up_proj, mlp.down_proj = nn.Linear(64, 64), nn.Linear(32, 64)
    mlp.to(torch.bfloat16)
    AMX.pack_layers(mlp)
    assert mlp.gate_up_proj.silu_mul and not mlp.down_proj.silu_mul
    assert not AMX.pack(torch.zeros(48, 32, dtype=torch.bfloat16), None, gate_up=True).silu_mul


@pytest.mark.parametrize("silu_mul", [False, True])
def test_amx_linear_rows_do_not_depend_on_the_row_count(silu_mul):
    # Batch invariance needs nothing here: each output is one chain of tile dot products over K,
    # whatever the rows of its tile or the number of row blocks (1,030 rows: two blocks).
    generator = torch.Generator().manual_seed(9)
    weight = torch.randn(192, 576, generator=generator).to(torch.bfloat16) * 0.05
    layer = AmxLinear(weight, None, KERNELS, silu_mul=silu_mul)
    x = torch.randn(1030, 576, generator=generator).to(torch.bfloat16)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(0, 1030, 41)])
    for rows in (2, 15, 17, 33, 100, 1030):
        got = layer(x[:rows])[::41]
        assert torch.equal(got, alone[:len(got)]), rows
