"""PackedLinear (oneDNN-prepacked bf16 weights) computes what F.linear computes, for any batch size;
the row buckets a packed model runs at, and the warm-up that compiles them."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from splitfuse.platforms.cpu.linear import (LinearPacker, PackedLinear, packing_supported, padded_rows, row_buckets,
                                            warm_up)

ONEDNN = LinearPacker(amx=None)  # every layer on oneDNN, AMX CPU or not

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
    assert ONEDNN.pack_layers(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[1][0], PackedLinear)
    assert model(torch.ones(3, 8, dtype=torch.bfloat16)).shape == (3, 4)


def test_fp32_and_non_cpu_are_not_packed():
    assert not packing_supported(torch.device("cpu"), torch.float32)
    assert not packing_supported(torch.device("meta"), torch.bfloat16)


def test_padded_rows_are_exact_to_8_then_multiples_of_8_to_64_then_of_64():
    assert [padded_rows(r) for r in (1, 2, 8, 9, 16, 17, 63, 64, 65, 128, 129, 500, 2048)] == \
        [1, 2, 8, 16, 16, 24, 64, 64, 128, 128, 192, 512, 2048]
    assert row_buckets(20) == [1, 2, 3, 4, 5, 6, 7, 8, 16, 24]
    assert row_buckets(130) == [1, 2, 3, 4, 5, 6, 7, 8, 16, 24, 32, 40, 48, 56, 64, 128, 192]
    assert all(padded_rows(r) in row_buckets(300) for r in range(1, 301))


def test_warm_up_runs_each_distinct_shape_once_per_bucket(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)).to(torch.bfloat16)
    ONEDNN.pack_layers(model)
    logits = PackedLinear(torch.zeros(32, 8, dtype=torch.bfloat16), None)
    calls = []
    original = PackedLinear.forward

    def recording_forward(self, x):
        calls.append((self.in_features, self.out_features, x.shape[0]))
        return original(self, x)

    monkeypatch.setattr(PackedLinear, "forward", recording_forward)
    warm_up(model, max_rows=12, logits=logits, max_logit_rows=3)
    buckets = [1, 2, 3, 4, 5, 6, 7, 8, 16]
    # The two 8 -> 16 layers share one shape, so only the first is run; the logits layer up to 3 rows.
    assert calls == ([(8, 16, rows) for rows in buckets] + [(16, 8, rows) for rows in buckets]
                     + [(8, 32, rows) for rows in (1, 2, 3)])


def test_warm_up_leaves_matmuls_too_big_to_be_worth_it_to_the_first_step(monkeypatch):
    from splitfuse.platforms.cpu import linear

    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)).to(torch.bfloat16)
    ONEDNN.pack_layers(model)
    calls = []
    original = PackedLinear.forward
    monkeypatch.setattr(PackedLinear, "forward", lambda self, x: calls.append(x.shape[0]) or original(self, x))
    monkeypatch.setattr(linear, "_WARM_UP_MAX_MACS", 8 * 16 * 5)  # up to 5 rows of an 8x16 matmul
    warm_up(model, max_rows=12)
    assert calls == [1, 2, 3, 4, 5] * 2


def test_row_tiled_packed_linear_rows_do_not_depend_on_the_row_count():
    # oneDNN picks its kernel by row count (past 32 rows a row's rounding changes); with row_tile every
    # call runs at ROW_TILE rows, so a row is the same alone, in any batch, and padded in the last tile.
    from splitfuse.platforms.cpu.linear import ROW_TILE

    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(1536, 576, generator=generator).to(torch.bfloat16) * 0.05
    x = torch.randn(300, 576, generator=generator).to(torch.bfloat16)
    tiled, plain = PackedLinear(weight, None, row_tile=ROW_TILE), PackedLinear(weight, None)
    alone = torch.cat([tiled(x[i:i + 1]) for i in range(300)])
    assert torch.equal(alone, torch.cat([plain(x[i:i + 1]) for i in range(300)]))  # 32 rows == 1 row
    for rows in (2, 31, 33, 64, 100, 300):
        got = tiled(x[:rows])
        assert got.shape == (rows, 1536) and torch.equal(got, alone[:rows]), rows
    assert not torch.equal(plain(x), alone)  # why it is needed: 300 rows at once round some rows otherwise
