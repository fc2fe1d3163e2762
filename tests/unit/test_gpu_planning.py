"""The host-side parts of the CUDA path, on the CPU: graph capture sizes, memory sizing, FlashInfer's page table."""

import numpy as np
import pytest
import torch

from splitfuse.attention.backend import BatchLayout
from splitfuse.config import CacheConfig
from splitfuse.platforms.cuda.flashinfer_backend import page_table, window_left
from splitfuse.platforms.cuda.graphs import capture_sizes
from splitfuse.platforms.cuda.memory import kv_cache_bytes
from splitfuse.worker.model_runner import profiling_batch

GIB = 1 << 30


def test_capture_sizes_cover_every_batch_up_to_the_largest():
    assert capture_sizes(1) == (1,)
    assert capture_sizes(8) == (1, 2, 4, 8)
    assert capture_sizes(20) == (1, 2, 4, 8, 16, 32)
    assert capture_sizes(64) == (1, 2, 4, 8, 16, 32, 48, 64)
    assert capture_sizes(1000)[-3:] == (224, 240, 256)  # at most 256
    for max_batch in range(1, 257):
        sizes = capture_sizes(max_batch)
        assert sizes[-1] >= max_batch and list(sizes) == sorted(set(sizes))


def test_the_kv_pool_gets_the_share_left_after_the_profiled_peak():
    assert kv_cache_bytes(80 * GIB, 0.9, 20 * GIB) == 52 * GIB
    assert kv_cache_bytes(141 * GIB, 0.5, 17 * GIB) == int(141 * GIB * 0.5) - 17 * GIB
    with pytest.raises(ValueError, match=r"^gpu_memory_utilization 0.2 of 80.0 GiB leaves no room for the KV cache: "
                                         r"the model and a full step take 16.0 GiB \(raise gpu_memory_utilization, "
                                         r"lower max_num_batched_tokens, or give kv_cache_memory\)$"):
        kv_cache_bytes(80 * GIB, 0.2, 16 * GIB)


def test_gpu_memory_utilization_is_checked():
    assert CacheConfig().gpu_memory_utilization == 0.9
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"^gpu_memory_utilization must be in \(0, 1\], got {bad}$"):
            CacheConfig(gpu_memory_utilization=bad)


def test_the_profiling_step_is_the_largest_step_in_a_one_block_pool():
    token_ids, positions, layout = profiling_batch(7, max_model_len=3, block_size=2)
    assert token_ids == [0] * 7
    assert layout.query_lens.tolist() == [3, 3, 1] and layout.context_lens.tolist() == [3, 3, 1]
    assert layout.query_start_loc.tolist() == [0, 3, 6, 7]
    assert positions.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert layout.block_tables.tolist() == [[0, 0], [0, 0], [0, 0]]
    assert layout.slot_mapping.tolist() == [0, 1, 0, 0, 1, 0, 0]  # every slot in block 0
    assert layout.num_decodes == 1
    _, _, whole = profiling_batch(512, max_model_len=4096, block_size=16)
    assert whole.query_lens.tolist() == [512] and whole.block_tables.shape == (1, 32)


def layout(query_lens, context_lens, tables, block_size):
    query_lens, context_lens = np.array(query_lens), np.array(context_lens)
    return BatchLayout(query_lens=query_lens, context_lens=context_lens,
                       query_start_loc=np.concatenate([[0], np.cumsum(query_lens)]),
                       block_tables=np.array(tables), slot_mapping=torch.zeros(int(query_lens.sum()), dtype=torch.long),
                       num_decodes=int((query_lens == 1).sum()), block_size=block_size)


def test_flashinfer_page_table_lists_each_requests_pages_in_order():
    table = page_table(layout([1, 3], [6, 3], [[7, 2], [5, 0]], block_size=4))
    assert table.qo_indptr.tolist() == [0, 1, 4]
    assert table.kv_indptr.tolist() == [0, 2, 3]
    assert table.kv_indices.tolist() == [7, 2, 5]
    assert table.last_page_len.tolist() == [2, 3]
    assert {a.dtype for a in (table.qo_indptr, table.kv_indptr, table.kv_indices, table.last_page_len)} == \
        {np.dtype(np.int32)}
    full = page_table(layout([1, 1, 8], [8, 9, 16], [[3, 1, 0, 0], [4, 6, 9, 0], [8, 2, 11, 12]], block_size=4))
    assert full.kv_indptr.tolist() == [0, 2, 5, 9]
    assert full.kv_indices.tolist() == [3, 1, 4, 6, 9, 8, 2, 11, 12]
    assert full.last_page_len.tolist() == [4, 1, 4]  # a full last page holds page_size tokens, never 0
    with pytest.raises(ValueError, match=r"^the FlashInfer backend needs every request to have at least one token "
                                         r"of KV$"):
        page_table(layout([1], [0], [[0]], block_size=4))


def test_flashinfer_window_left_matches_our_sliding_window():
    # ours: key k is visible from position p iff p - window < k <= p; FlashInfer's: p - window_left <= k <= p
    assert window_left(None) == -1
    assert window_left(4) == 3
    for window in (1, 4, 4096):
        p = 100
        ours = [k for k in range(p + 1) if p - window < k <= p]
        assert ours == [k for k in range(p + 1) if p - window_left(window) <= k]
