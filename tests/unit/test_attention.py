"""Torch-native paged attention equals plain attention computed request by request."""

import numpy as np
import pytest
import torch

from splitfuse.attention.backend import BatchLayout
from splitfuse.attention.torch_native import TorchNativeBackend, decode_buckets

BLOCK_SIZE, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 4, 2, 8


def test_decode_buckets_split_where_context_grows():
    assert decode_buckets(np.array([10, 11, 12, 13, 40, 41, 42, 43])) == [(0, 4), (4, 8)]
    assert decode_buckets(np.array([10, 11, 40])) == [(0, 3)]  # too few rows to split
    assert decode_buckets(np.array([5])) == [(0, 1)]


def reference(query, keys, values, start, window):
    """Causal (optionally windowed) attention of query rows at positions start.. over keys 0..ctx-1."""
    group = NUM_HEADS // NUM_KV_HEADS
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query, keys) * HEAD_DIM ** -0.5
    q_pos = torch.arange(start, start + query.shape[0])[:, None]
    k_pos = torch.arange(keys.shape[0])[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)


@pytest.mark.parametrize("window", [None, 6])
def test_paged_attention_matches_dense_reference(window):
    generator = torch.Generator().manual_seed(0)
    # Ten decodes whose contexts span two buckets, then a fresh prompt and a later chunk of another.
    decode_contexts = [3, 5, 6, 7, 9, 20, 21, 22, 25, 30]
    chunks = [(0, 7), (9, 5)]  # (start, query_len)
    requests = [(c - 1, 1) for c in decode_contexts] + chunks
    num_blocks = 64
    permutation = torch.randperm(num_blocks, generator=generator).tolist()  # scattered blocks
    key_cache = torch.zeros(num_blocks * BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    value_cache = torch.zeros_like(key_cache)
    tables, full_keys, full_values, slots, queries = [], [], [], [], []
    for start, query_len in requests:
        context = start + query_len
        table = [permutation.pop() for _ in range(-(-context // BLOCK_SIZE))]
        keys = torch.randn(context, NUM_KV_HEADS, HEAD_DIM, generator=generator)
        values = torch.randn(context, NUM_KV_HEADS, HEAD_DIM, generator=generator)
        for position in range(start):  # earlier tokens are already in the cache
            slot = table[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE
            key_cache[slot], value_cache[slot] = keys[position], values[position]
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, context)]
        tables.append(table)
        full_keys.append(keys)
        full_values.append(values)
        queries.append(torch.randn(query_len, NUM_HEADS, HEAD_DIM, generator=generator))
    query_lens = np.array([q for _, q in requests])
    block_tables = np.zeros((len(requests), max(map(len, tables))), dtype=np.int64)
    for i, table in enumerate(tables):
        block_tables[i, :len(table)] = table
    layout = BatchLayout(query_lens=query_lens, context_lens=np.array([s + q for s, q in requests]),
                         query_start_loc=np.concatenate([[0], np.cumsum(query_lens)]), block_tables=block_tables,
                         slot_mapping=torch.tensor(slots), num_decodes=len(decode_contexts), block_size=BLOCK_SIZE)
    backend = TorchNativeBackend(torch.device("cpu"))
    metadata = backend.plan(layout, (window,))
    assert [(b.row_start, b.row_end) for b in metadata.decode_buckets] == [(0, 4), (4, 8), (8, 10)]

    new_keys = torch.cat([k[s:] for k, (s, _) in zip(full_keys, requests)])
    new_values = torch.cat([v[s:] for v, (s, _) in zip(full_values, requests)])
    output = backend.forward(torch.cat(queries), new_keys, new_values, (key_cache, value_cache), metadata,
                             scale=HEAD_DIM ** -0.5, sliding_window=window)

    expected = torch.cat([reference(q, k, v, s, window)
                          for q, k, v, (s, _) in zip(queries, full_keys, full_values, requests)])
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
