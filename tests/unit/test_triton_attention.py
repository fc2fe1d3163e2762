"""The Triton paged-attention backend equals the torch-native one (under the interpreter without CUDA)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("triton")

from splitfuse.attention.backend import BatchLayout  # noqa: E402
from splitfuse.attention.torch_native import TorchNativeBackend  # noqa: E402
from splitfuse.platforms.cuda.triton_attention import TritonAttentionBackend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2),
             torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def build_case(requests, *, block_size=4, num_heads=4, num_kv_heads=2, head_dim=8, dtype=torch.float32,
               seed=0, padding_rows=0):
    """requests: (cached, query_len) pairs, decodes first, over shuffled blocks; cache holds the cached part.

    Returns the layout and (query, key, value, kv_cache); ``padding_rows`` extra query rows beyond the slots."""
    generator = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(s + q) // block_size) for s, q in requests) + 4
    free = torch.randperm(num_blocks, generator=generator).tolist()
    cache = [torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
             for _ in range(2)]
    tables, slots = [], []
    for start, query_len in requests:
        table = [free.pop() for _ in range(-(-(start + query_len) // block_size))]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(start, start + query_len)]
    query_lens = np.array([q for _, q in requests])
    block_tables = np.zeros((len(requests), max(map(len, tables))), dtype=np.int64)
    for i, table in enumerate(tables):
        block_tables[i, :len(table)] = table
    num_rows = int(query_lens.sum()) + padding_rows
    fused = torch.randn(num_rows, (num_heads + 2 * num_kv_heads) * head_dim, generator=generator).to(dtype)
    query, key, value = fused.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], 1)
    inputs = (query.view(num_rows, num_heads, head_dim), key.view(num_rows, num_kv_heads, head_dim),
              value.view(num_rows, num_kv_heads, head_dim))  # non-contiguous views of one qkv tensor
    layout = BatchLayout(query_lens=query_lens, context_lens=np.array([s + q for s, q in requests]),
                         query_start_loc=np.concatenate([[0], np.cumsum(query_lens)]), block_tables=block_tables,
                         slot_mapping=torch.tensor(slots, dtype=torch.int64),
                         num_decodes=sum(q == 1 for _, q in requests), block_size=block_size)
    return layout, inputs, tuple(cache)


def run_both(layout, inputs, cache, window, num_splits=None, **backend_kwargs):
    head_dim = inputs[0].shape[2]
    reference_cache = tuple(c.clone() for c in cache)
    torch_backend = TorchNativeBackend(torch.device("cpu"))
    expected = torch_backend.forward(*inputs, reference_cache, torch_backend.plan(layout, (window,)),
                                     scale=head_dim ** -0.5, sliding_window=window)
    backend = TritonAttentionBackend(DEVICE, **backend_kwargs)
    device_layout = BatchLayout(**{**layout.__dict__, "slot_mapping": layout.slot_mapping.to(DEVICE)})
    metadata = backend.plan(device_layout, (window,), num_splits=num_splits)
    device_cache = tuple(c.to(DEVICE) for c in cache)
    output = backend.forward(*(t.to(DEVICE) for t in inputs), device_cache, metadata,
                             scale=head_dim ** -0.5, sliding_window=window)
    for written, reference_written in zip(device_cache, reference_cache):
        assert torch.equal(written.cpu(), reference_written)  # the KV write is exact
    return output.cpu(), expected, metadata


# Decodes first, then a fresh prompt, a chunk over a cached context, and a chunk longer than block_q.
MIXED = [(2, 1), (8, 1), (29, 1), (0, 1), (0, 7), (9, 5), (14, 20)]


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("num_splits", [1, 2, 3])
def test_mixed_batch_matches_torch_native_for_any_split(window, num_splits):
    output, expected, metadata = run_both(*build_case(MIXED), window, num_splits, block_n=16)
    assert (metadata.num_tiles, metadata.num_splits) == (8, num_splits)  # the 20-row chunk is 16 + 4 rows
    torch.testing.assert_close(output, expected, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_torch_native(dtype):
    output, expected, _ = run_both(*build_case(MIXED, dtype=dtype), None, 2, block_n=16)
    assert output.dtype == dtype
    torch.testing.assert_close(output.float(), expected.float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("num_heads, block_size", [(2, 16), (8, 16)])  # MHA; a group of 4 heads
def test_head_groups_and_page_sizes(num_heads, block_size):
    case = build_case(MIXED, num_heads=num_heads, block_size=block_size, head_dim=16)
    output, expected, _ = run_both(*case, 10, 2, block_n=16)
    torch.testing.assert_close(output, expected, **TOLERANCE[torch.float32])


def test_padding_rows_are_zero_and_write_nothing():
    # A CUDA-graph padding request (query_len 1, context_len 0, slot -1) after the real ones, then
    # two query rows beyond len(slot_mapping).
    layout, inputs, cache = build_case(MIXED, padding_rows=3)
    padded = BatchLayout(
        query_lens=np.append(layout.query_lens, 1), context_lens=np.append(layout.context_lens, 0),
        query_start_loc=np.append(layout.query_start_loc, layout.query_start_loc[-1] + 1),
        block_tables=np.vstack([layout.block_tables, np.zeros_like(layout.block_tables[:1])]),
        slot_mapping=torch.cat([layout.slot_mapping, torch.tensor([-1])]).to(DEVICE),
        num_decodes=layout.num_decodes, block_size=layout.block_size)
    reference_inputs = tuple(t[:-3] for t in inputs)
    reference_cache = tuple(c.clone() for c in cache)
    torch_backend = TorchNativeBackend(torch.device("cpu"))
    expected = torch_backend.forward(*reference_inputs, reference_cache, torch_backend.plan(layout, (None,)),
                                     scale=8 ** -0.5, sliding_window=None)
    for num_splits in (1, 3):
        backend = TritonAttentionBackend(DEVICE, block_n=16)
        device_cache = tuple(c.to(DEVICE) for c in cache)
        output = backend.forward(*(t.to(DEVICE) for t in inputs), device_cache,
                                 backend.plan(padded, (None,), num_splits=num_splits),
                                 scale=8 ** -0.5, sliding_window=None).cpu()
        torch.testing.assert_close(output[:-3], expected, **TOLERANCE[torch.float32])
        assert torch.equal(output[-3:], torch.zeros_like(output[-3:]))
        assert all(torch.equal(c.cpu(), r) for c, r in zip(device_cache, reference_cache))  # slot -1 skipped


def test_metadata_buffers_are_reused_while_sizes_do_not_grow():
    backend = TritonAttentionBackend(DEVICE)
    small, _, _ = build_case(MIXED[:3])
    large, _, _ = build_case(MIXED)
    first = backend.plan(large, (None,))
    second = backend.plan(small, (None,))
    assert second.tiles.data_ptr() == first.tiles.data_ptr()
    assert second.block_tables.data_ptr() == first.block_tables.data_ptr()
    assert second.block_tables.stride() == first.block_tables.stride()


def test_split_heuristic():
    backend = TritonAttentionBackend(DEVICE, num_kv_heads=8, num_sms=132)
    long_decodes, _, _ = build_case([(2000, 1)] * 2, block_size=16)
    assert backend.plan(long_decodes, (None,)).num_splits == 8  # 2 tiles x 8 heads: 132 / 16 -> 9; 32 KV tiles / 4 per split -> 8
    short, _, _ = build_case(MIXED)
    assert backend.plan(short, (None,)).num_splits == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_real_sizes_on_gpu(dtype):
    requests = [(2047, 1)] * 6 + [(1500, 300), (0, 700)]
    case = build_case(requests, block_size=16, num_heads=32, num_kv_heads=8, head_dim=128, dtype=dtype)
    output, expected, metadata = run_both(*case, None)
    torch.testing.assert_close(output.float(), expected.float(), **TOLERANCE[dtype])
