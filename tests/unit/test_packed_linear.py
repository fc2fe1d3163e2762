"""PackedLinear (oneDNN-prepacked bf16 weights) computes what F.linear computes, for any batch size."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from splitfuse.layers.linear import PackedLinear, pack_linear_layers, packing_supported

pytestmark = pytest.mark.skipif(not packing_supported(torch.device("cpu"), torch.bfloat16),
                                reason="oneDNN bf16 weight packing unavailable")


@pytest.mark.parametrize("rows", [1, 7, 32, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(rows, bias):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=generator).to(torch.bfloat16)
    bias_tensor = torch.randn(96, generator=generator).to(torch.bfloat16) if bias else None
    x = torch.randn(rows, 64, generator=generator).to(torch.bfloat16)
    expected = F.linear(x.float(), weight.float(), None if bias_tensor is None else bias_tensor.float())
    got = PackedLinear(weight, bias_tensor)(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 96)
    torch.testing.assert_close(got.float(), expected, atol=0.1, rtol=0.02)


def test_pack_linear_layers_replaces_every_linear():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4), nn.ReLU())).to(torch.bfloat16)
    assert pack_linear_layers(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[1][0], PackedLinear)
    assert model(torch.ones(3, 8, dtype=torch.bfloat16)).shape == (3, 4)


def test_fp32_and_non_cpu_are_not_packed():
    assert not packing_supported(torch.device("cpu"), torch.float32)
    assert not packing_supported(torch.device("meta"), torch.bfloat16)
