"""KVStore: block reads, writes and copies over every layer of a tiny CPU pool, with exact values and errors."""

import pytest
import torch

from splitfuse.attention.torch_native import TorchNativeBackend
from splitfuse.worker.kv_store import KVStore

# 2 layers, 3 blocks of 2 tokens, 1 KV head of dim 2: a block is 2 * 1 * 2 = 4 elements per tensor.
NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE = 2, 3, 2


def make_store() -> KVStore:
    return KVStore(TorchNativeBackend(torch.device("cpu")), NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, num_kv_heads=1, head_dim=2, dtype=torch.float32,
                   device=torch.device("cpu"))


def test_read_of_a_fresh_pool_is_zeros_in_the_documented_shape():
    store = make_store()
    assert store.block_elements == 4
    data = store.read_blocks([0, 2])
    assert data.shape == (NUM_LAYERS, 2, 2, 4)
    assert data.count_nonzero() == 0


def test_write_then_read_round_trips_and_lands_in_the_layer_tensors():
    store = make_store()
    data = torch.arange(NUM_LAYERS * 2 * 2 * 4, dtype=torch.float32).view(NUM_LAYERS, 2, 2, 4)
    store.write_blocks([2, 0], data)
    assert torch.equal(store.read_blocks([2, 0]), data)
    # read in the other order: the blocks swap places
    assert torch.equal(store.read_blocks([0, 2]), data[:, :, [1, 0]])
    # Layer 1's value tensor, [num_blocks * block_size, 1, 2]: block 2 is rows 4..5, block 0 rows 0..1.
    value = store.layers[1][1]
    assert value[4:6].flatten().tolist() == [24.0, 25.0, 26.0, 27.0]
    assert value[0:2].flatten().tolist() == [28.0, 29.0, 30.0, 31.0]
    assert value[2:4].flatten().tolist() == [0.0, 0.0, 0.0, 0.0]  # block 1 untouched
    assert store.layers[0][0][4:6].flatten().tolist() == [0.0, 1.0, 2.0, 3.0]


def test_copy_blocks_copies_every_layer_key_and_value():
    store = make_store()
    data = torch.arange(NUM_LAYERS * 2 * 1 * 4, dtype=torch.float32).view(NUM_LAYERS, 2, 1, 4) + 1
    store.write_blocks([2], data)
    store.copy_blocks([2], [1])
    assert torch.equal(store.read_blocks([1]), data)
    assert torch.equal(store.read_blocks([2]), data)
    assert store.read_blocks([0]).count_nonzero() == 0


@pytest.mark.parametrize("block_ids, bad", [([0, 3], 3), ([-1], -1)])
def test_block_ids_outside_the_pool_raise(block_ids, bad):
    store = make_store()
    message = rf"block id {bad} is outside the pool \(0..2\)"
    with pytest.raises(ValueError, match=message):
        store.read_blocks(block_ids)
    with pytest.raises(ValueError, match=message):
        store.write_blocks(block_ids, torch.ones(NUM_LAYERS, 2, len(block_ids), 4))
    assert store.read_blocks([0, 1, 2]).count_nonzero() == 0  # a rejected write wrote nothing


def test_data_of_the_wrong_shape_raises_and_writes_nothing():
    store = make_store()
    with pytest.raises(ValueError, match=r"KV data of shape \(2, 2, 1, 4\) does not fit 2 blocks "
                                         r"\(expected \(2, 2, 2, 4\)\)"):
        store.write_blocks([0, 1], torch.ones(2, 2, 1, 4))
    with pytest.raises(ValueError, match=r"KV data of shape \(1, 2, 1, 4\) does not fit 1 blocks"):
        store.write_blocks([0], torch.ones(1, 2, 1, 4))
    assert store.read_blocks([0, 1, 2]).count_nonzero() == 0


def test_copy_with_mismatched_lengths_raises():
    with pytest.raises(ValueError, match="2 source blocks for 1 destinations"):
        make_store().copy_blocks([0, 1], [2])
