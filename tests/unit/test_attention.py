"""Torch-native paged attention equals plain attention computed request by request."""

import numpy as np
import pytest
import torch

from splitfuse.attention.backend import BatchLayout
from splitfuse.attention.torch_native import TorchNativeBackend, decode_buckets
from splitfuse.platforms import resolve_platform
from splitfuse.platforms.cpu.attention import CpuPagedBackend

BLOCK_SIZE, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 4, 2, 8
KERNELS = resolve_platform(torch.device("cpu"), torch.float32).kernels
needs_cpu_kernel = pytest.mark.skipif(KERNELS is None, reason="no C compiler for the CPU kernel")


def test_decode_buckets_split_where_context_grows():
    assert decode_buckets(np.array([10, 11, 12, 13, 40, 41, 42, 43])) == [(0, 4), (4, 8)]
    assert decode_buckets(np.array([10, 11, 40])) == [(0, 3)]  # too few rows to split
    assert decode_buckets(np.array([5])) == [(0, 1)]


@pytest.mark.parametrize("backend_name", ["torch", pytest.param("cpu-kernel", marks=needs_cpu_kernel)])
def test_kv_cache_shape_is_one_row_per_token_slot(backend_name):
    # The KV store allocates what the backend reads: 10 blocks of 4 slots, 2 KV heads of 8.
    platform = resolve_platform(torch.device("cpu"), torch.float32, attention_backend=backend_name)
    assert platform.attention_backend.kv_cache_shape(10, 4, 2, 8) == (40, 2, 8)


def reference(query, keys, values, start, window, head_dim=HEAD_DIM):
    """Causal (optionally windowed) attention of query rows at positions start.. over keys 0..ctx-1."""
    group = query.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query, keys) * head_dim ** -0.5
    q_pos = torch.arange(start, start + query.shape[0])[:, None]
    k_pos = torch.arange(keys.shape[0])[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)


def build_case(requests, window, *, head_dim=HEAD_DIM, dtype=torch.float32, seed=0, block_size=BLOCK_SIZE,
               num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS):
    """A paged batch over scattered blocks: layout, (query, key, value, kv_cache) and the dense reference.

    requests: (start, query_len) pairs; positions before start are already in the cache.
    """
    generator = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(s + q) // block_size) for s, q in requests) + 8
    permutation = torch.randperm(num_blocks, generator=generator).tolist()  # scattered blocks
    key_cache = torch.zeros(num_blocks * block_size, num_kv_heads, head_dim, dtype=dtype)
    value_cache = torch.zeros_like(key_cache)
    tables, full_keys, full_values, slots, queries = [], [], [], [], []
    for start, query_len in requests:
        context = start + query_len
        table = [permutation.pop() for _ in range(-(-context // block_size))]
        keys = torch.randn(context, num_kv_heads, head_dim, generator=generator).to(dtype)
        values = torch.randn(context, num_kv_heads, head_dim, generator=generator).to(dtype)
        for position in range(start):
            slot = table[position // block_size] * block_size + position % block_size
            key_cache[slot], value_cache[slot] = keys[position], values[position]
        slots += [table[p // block_size] * block_size + p % block_size for p in range(start, context)]
        tables.append(table)
        full_keys.append(keys)
        full_values.append(values)
        queries.append(torch.randn(query_len, num_heads, head_dim, generator=generator).to(dtype))
    query_lens = np.array([q for _, q in requests])
    block_tables = np.zeros((len(requests), max(map(len, tables))), dtype=np.int64)
    for i, table in enumerate(tables):
        block_tables[i, :len(table)] = table
    layout = BatchLayout(query_lens=query_lens, context_lens=np.array([s + q for s, q in requests]),
                         query_start_loc=np.concatenate([[0], np.cumsum(query_lens)]), block_tables=block_tables,
                         slot_mapping=torch.tensor(slots), num_decodes=sum(q == 1 for _, q in requests),
                         block_size=block_size)
    new_keys = torch.cat([k[s:] for k, (s, _) in zip(full_keys, requests)])
    new_values = torch.cat([v[s:] for v, (s, _) in zip(full_values, requests)])
    inputs = (torch.cat(queries), new_keys, new_values, (key_cache, value_cache))
    expected = torch.cat([reference(q.float(), k.float(), v.float(), s, window, head_dim)
                          for q, k, v, (s, _) in zip(queries, full_keys, full_values, requests)])
    return layout, inputs, expected


# Ten decodes whose contexts span two buckets, then a fresh prompt and a later chunk of another.
DECODE_CONTEXTS = [3, 5, 6, 7, 9, 20, 21, 22, 25, 30]
MIXED_BATCH = [(c - 1, 1) for c in DECODE_CONTEXTS] + [(0, 7), (9, 5)]


@pytest.mark.parametrize("window", [None, 6])
def test_paged_attention_matches_dense_reference(window):
    layout, inputs, expected = build_case(MIXED_BATCH, window)
    backend = TorchNativeBackend(torch.device("cpu"))
    metadata = backend.plan(layout, (window,))
    assert [(b.row_start, b.row_end) for b in metadata.decode_buckets] == [(0, 4), (4, 8), (8, 10)]
    output = backend.forward(*inputs, metadata, scale=HEAD_DIM ** -0.5, sliding_window=window)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window, sdpa_calls", [(None, 4), (50, 4), (6, 6)])
def test_back_to_back_fresh_chunks_of_one_length_share_one_sdpa_call(window, sdpa_calls, monkeypatch):
    from splitfuse.attention import torch_native

    # Three fresh 20-token prompts (one call), a 30-token one, a chunk over a cached context, and a
    # fresh 20-token prompt not adjacent to the first three. A window shorter than the prompts needs
    # a mask per chunk, and those go one by one.
    requests = [(0, 20), (0, 20), (0, 20), (0, 30), (5, 20), (0, 20)]
    layout, (query, key, value, kv_cache), expected = build_case(requests, window)
    chunks = TorchNativeBackend(torch.device("cpu")).plan(layout, (window,)).chunks
    assert len(chunks) == 6
    calls = []
    sdpa = torch_native._sdpa
    monkeypatch.setattr(torch_native, "_sdpa", lambda q, *args: calls.append(q.shape[0]) or sdpa(q, *args))
    kv_cache[0].index_copy_(0, layout.slot_mapping, key)
    kv_cache[1].index_copy_(0, layout.slot_mapping, value)
    output = torch.zeros_like(query)
    torch_native.run_chunks(chunks, output, query, key, value, kv_cache, BLOCK_SIZE, scale=HEAD_DIM ** -0.5,
                            sliding_window=window)
    assert len(calls) == sdpa_calls and (calls[0] == 3) == (window != 6)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    one_by_one = torch.zeros_like(query)
    for chunk in chunks:
        torch_native.run_chunks([chunk], one_by_one, query, key, value, kv_cache, BLOCK_SIZE,
                                scale=HEAD_DIM ** -0.5, sliding_window=window)
    assert torch.equal(output, one_by_one)  # batching changes nothing, bit for bit


# Decodes and chunks of up to 16 tokens go to the kernel (the 12-token chunk is two work items of
# 8 tokens x 4 heads); a fresh prompt of 70 tokens and a continuing chunk of 40 go to SDPA.
KERNEL_BATCH = MIXED_BATCH + [(20, 12), (0, 70), (33, 40)]


@needs_cpu_kernel
@pytest.mark.parametrize("window", [None, 6, 50])
@pytest.mark.parametrize("head_dim", [8, 64])  # 8: the plain C loops; 64: the vector loops where built
def test_cpu_kernel_matches_dense_reference_fp32(window, head_dim):
    layout, inputs, expected = build_case(KERNEL_BATCH, window, head_dim=head_dim)
    backend = CpuPagedBackend(KERNELS)
    metadata = backend.plan(layout, (window,))
    assert metadata.kernel_requests.tolist() == list(range(13))
    assert [(c.token_start, c.token_end) for c in metadata.chunks] == [(34, 104), (104, 144)]
    output = backend.forward(*inputs, metadata, scale=head_dim ** -0.5, sliding_window=window)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


@needs_cpu_kernel
@pytest.mark.parametrize("window", [None, 6, 40])
def test_cpu_kernel_with_one_head_per_kv_head_and_blocks_longer_than_a_vector(window):
    # Without GQA a decode is one row per KV head and a 7-token chunk seven; blocks of 32 keys are
    # two 16-key sub-blocks in the vector loops (head_dim 32), so every row-set size runs there.
    layout, inputs, expected = build_case(KERNEL_BATCH, window, head_dim=32, block_size=32, num_heads=4,
                                          num_kv_heads=4)
    backend = CpuPagedBackend(KERNELS)
    output = backend.forward(*inputs, backend.plan(layout, (window,)), scale=32 ** -0.5, sliding_window=window)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


@needs_cpu_kernel
@pytest.mark.parametrize("window", [None, 6])
def test_cpu_kernel_bf16_matches_reference_to_bf16_precision(window):
    layout, inputs, expected = build_case(KERNEL_BATCH, window, head_dim=64, dtype=torch.bfloat16)
    backend = CpuPagedBackend(KERNELS)
    output = backend.forward(*inputs, backend.plan(layout, (window,)), scale=64 ** -0.5, sliding_window=window)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), expected, atol=2e-2, rtol=2e-2)


@needs_cpu_kernel
@pytest.mark.parametrize("requests", [[(40, 1)], [(3, 16)]], ids=["one-decode", "one-chunk"])
def test_cpu_kernel_splits_kv_heads_when_requests_are_few(requests):
    # One request would leave a thread idle; the kernel then gives each KV head its own work item.
    layout, inputs, expected = build_case(requests, None, head_dim=64)
    backend = CpuPagedBackend(KERNELS)
    output = backend.forward(*inputs, backend.plan(layout, (None,)), scale=64 ** -0.5, sliding_window=None)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend_name", ["torch", pytest.param("cpu-kernel", marks=needs_cpu_kernel)])
def test_padding_rows_past_the_step_are_ignored(backend_name):
    # The runner pads a packed model's batch with dummy tokens: no KV is written for them, the real
    # rows come out as without padding, and the padding rows' output is zero.
    layout, (query, key, value, kv_cache), _ = build_case(KERNEL_BATCH, None)
    backend = TorchNativeBackend(torch.device("cpu")) if backend_name == "torch" else CpuPagedBackend(KERNELS)
    clean_cache = tuple(c.clone() for c in kv_cache)
    expected = backend.forward(query, key, value, clean_cache, backend.plan(layout, (None,)),
                               scale=HEAD_DIM ** -0.5, sliding_window=None)
    generator = torch.Generator().manual_seed(7)
    padded = [torch.cat([t, torch.randn(5, *t.shape[1:], generator=generator)]) for t in (query, key, value)]
    output = backend.forward(*padded, kv_cache, backend.plan(layout, (None,)), scale=HEAD_DIM ** -0.5,
                             sliding_window=None)
    num_tokens = query.shape[0]
    assert output.shape == (num_tokens + 5, NUM_HEADS, HEAD_DIM)
    assert torch.equal(output[:num_tokens], expected)
    assert torch.equal(output[num_tokens:], torch.zeros(5, NUM_HEADS, HEAD_DIM))
    assert all(torch.equal(a, b) for a, b in zip(kv_cache, clean_cache))



def paged_batch(requests, block_size):
    """requests: (start, keys [ctx, KVH, D], values, queries [ctx - start, H, D]); positions < start cached.

    -> (layout, query, key, value, kv_cache) with each request's blocks scattered over the pool."""
    num_blocks = sum(-(-k.shape[0] // block_size) for _, k, _, _ in requests) + 4
    free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(num_blocks)).tolist()
    key_cache = torch.zeros(num_blocks * block_size, *requests[0][1].shape[1:], dtype=requests[0][1].dtype)
    value_cache = torch.zeros_like(key_cache)
    tables, slots = [], []
    for start, keys, values, _ in requests:
        table = [free.pop() for _ in range(-(-keys.shape[0] // block_size))]
        request_slots = torch.tensor([table[p // block_size] * block_size + p % block_size
                                      for p in range(keys.shape[0])])
        key_cache[request_slots[:start]], value_cache[request_slots[:start]] = keys[:start], values[:start]
        tables.append(table)
        slots.append(request_slots[start:])
    query_lens = np.array([q.shape[0] for _, _, _, q in requests])
    block_tables = np.zeros((len(requests), max(map(len, tables))), dtype=np.int64)
    for i, table in enumerate(tables):
        block_tables[i, :len(table)] = table
    layout = BatchLayout(query_lens=query_lens, context_lens=np.array([k.shape[0] for _, k, _, _ in requests]),
                         query_start_loc=np.concatenate([[0], np.cumsum(query_lens)]), block_tables=block_tables,
                         slot_mapping=torch.cat(slots), num_decodes=int((query_lens == 1).sum()),
                         block_size=block_size)
    new_keys = torch.cat([keys[start:] for start, keys, _, _ in requests])
    new_values = torch.cat([values[start:] for start, _, values, _ in requests])
    query = torch.cat([q for _, _, _, q in requests])
    return layout, query, new_keys, new_values, (key_cache, value_cache)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [None, 6])
def test_batch_invariant_kernel_rows_do_not_depend_on_batch_or_chunking(dtype, window):
    # batch_invariant sends every request to the kernel, long chunks included (no SDPA). One request's
    # rows (a 70-token context) then come out bit for bit the same as one 70-token chunk alone, as a
    # 40-token chunk over 30 cached tokens inside a mixed batch, and as a decode at position 69.
    generator = torch.Generator().manual_seed(3)

    def request(context, start):
        keys, values = (torch.randn(context, NUM_KV_HEADS, 64, generator=generator).to(dtype) for _ in range(2))
        return [start, keys, values, torch.randn(context - start, NUM_HEADS, 64, generator=generator).to(dtype)]

    backend = CpuPagedBackend(KERNELS, batch_invariant=True)
    target = request(70, 0)
    results = {}
    for start, neighbours in [(0, []), (30, [request(9, 8), request(100, 0), request(20, 13)]),
                              (69, [request(40, 39), request(5, 0)])]:
        mine = [start, target[1], target[2], target[3][start:]]
        requests = sorted(neighbours + [mine], key=lambda r: r[3].shape[0] != 1)  # decodes first
        layout, query, key, value, kv_cache = paged_batch(requests, block_size=16)
        metadata = backend.plan(layout, (window,))
        assert metadata.chunks == []
        output = backend.forward(query, key, value, kv_cache, metadata, scale=0.125, sliding_window=window)
        first = int(layout.query_start_loc[next(i for i, r in enumerate(requests) if r is mine)])
        results[start] = output[first:first + 70 - start]
    assert torch.equal(results[30], results[0][30:])
    assert torch.equal(results[69], results[0][69:])
