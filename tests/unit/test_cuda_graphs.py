"""CUDA-graph decode logic (platforms/cuda/graphs.py) on the CPU: the Triton backend under the interpreter, a
real tiny model, and a graph stand-in that replays the captured callable on its captured arguments — so a
replay sees exactly what a real graph would: the buffers it was captured with, refilled in place."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("triton")

from splitfuse.models.config import ArchConfig  # noqa: E402
from splitfuse.models.loader import load_model  # noqa: E402
from splitfuse.platforms import Platform  # noqa: E402
from splitfuse.platforms.cuda.graphs import DecodeGraphs, tensor_addresses  # noqa: E402
from splitfuse.platforms.cuda.triton_attention import TritonAttentionBackend  # noqa: E402
from splitfuse.platforms.ops import TORCH_OPS  # noqa: E402
from splitfuse.sampling_params import SamplingParams  # noqa: E402
from splitfuse.worker.input_batch import RequestState, prepare_inputs  # noqa: E402
from splitfuse.worker.kv_store import KVStore  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK_SIZE = 4
MAX_BLOCKS = 8


class ReplayingGraphs:
    """torch.cuda graphs' stand-in: capture runs ``fn`` once and keeps it with its output; replay runs the same
    ``fn`` (same captured metadata object, same buffers) and writes into the captured output."""

    def capture(self, fn):
        output = fn()
        return (fn, output), output

    @staticmethod
    def replay(graph):
        fn, output = graph
        output.copy_(fn())

    @staticmethod
    def pinned(size, dtype):
        return torch.empty(size, dtype=dtype)


@pytest.fixture(scope="module")
def tiny(llama_ckpt):
    arch = ArchConfig.from_dir(llama_ckpt)
    backend = TritonAttentionBackend(DEVICE, num_kv_heads=arch.num_kv_heads)
    platform = Platform(DEVICE, torch.float32, False, backend, TORCH_OPS, None, None)
    return arch, backend, load_model(llama_ckpt, arch, platform)


def kv_pool(arch, backend):
    return KVStore(backend, arch.num_layers, 32, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim, torch.float32, DEVICE)


def states():
    generator = torch.Generator().manual_seed(3)
    lengths, tables = (5, 9, 3), ([3, 7, 0, 0], [12, 1, 30, 4], [9, 2, 0, 0])  # shuffled blocks
    return [RequestState(f"r{i}", torch.randint(10, 500, (n,), generator=generator).tolist(), [], SamplingParams(),
                         table, 0) for i, (n, table) in enumerate(zip(lengths, tables))]


def eager(model, backend, pool, token_ids, positions, layout):
    layout.slot_mapping = layout.slot_mapping.to(DEVICE)
    metadata = backend.plan(layout, (None,))
    return model(torch.tensor(token_ids, device=DEVICE), torch.from_numpy(positions).to(DEVICE), pool.layers, metadata)


def advance(requests, hidden, model, query_lens):
    """Greedy next token per request from its last row."""
    ends = np.cumsum(query_lens) - 1
    tokens = model.compute_logits(hidden[torch.from_numpy(ends)]).argmax(-1).tolist()
    for state, n, token in zip(requests, query_lens, tokens):
        state.num_computed_tokens += int(n)
        state.output_token_ids.append(token)
        state.all_token_ids.append(token)
    return tokens


@torch.inference_mode()
def test_replayed_decode_steps_equal_eager_ones(tiny):
    arch, backend, model = tiny
    pools = {"eager": kv_pool(arch, backend), "graph": kv_pool(arch, backend)}
    runs = {name: states() for name in pools}
    for name, requests in runs.items():  # the prompts, eagerly, into both pools
        query_lens = np.array([len(s.prompt_token_ids) for s in requests])
        advance(requests, eager(model, backend, pools[name], *prepare_inputs(requests, query_lens, BLOCK_SIZE)),
                model, query_lens)
    graph_pool = pools["graph"]
    graphs = DecodeGraphs(lambda ids, pos, metadata: model(ids, pos, graph_pool.layers, metadata), backend, (None,),
                          sizes=(1, 2, 4), max_blocks_per_request=MAX_BLOCKS, block_size=BLOCK_SIZE, device=DEVICE,
                          num_splits=lambda size: 2 if size <= 2 else 1, api=ReplayingGraphs())
    graphs.capture_all()
    for step in range(4):
        active = 3 if step < 2 else 2  # a smaller batch replays the size-2 graph (2 splits)
        outputs = {}
        for name, requests in runs.items():
            batch = requests[:active]
            token_ids, positions, layout = prepare_inputs(batch, np.ones(active, dtype=np.int64), BLOCK_SIZE)
            if name == "graph":
                assert graphs.takes(layout)
                hidden = graphs.run(token_ids, positions, layout).clone()
            else:
                hidden = eager(model, backend, pools[name], token_ids, positions, layout)
            outputs[name] = (hidden, advance(batch, hidden, model, np.ones(active, dtype=np.int64)))
        torch.testing.assert_close(outputs["graph"][0], outputs["eager"][0], atol=1e-5, rtol=1e-5)
        assert outputs["graph"][1] == outputs["eager"][1]
    assert graphs.num_replays == 4
    for (eager_key, _), (graph_key, _) in zip(pools["eager"].layers, graph_pool.layers):
        # the same KV: capture's and replays' padding rows (slot -1) wrote none over the prompts'
        torch.testing.assert_close(graph_key, eager_key, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_a_graph_is_not_replayed_over_moved_buffers(tiny):
    arch, _, model = tiny
    backend = TritonAttentionBackend(DEVICE, num_kv_heads=arch.num_kv_heads)  # buffers not reserved
    pool = kv_pool(arch, backend)
    graphs = DecodeGraphs(lambda ids, pos, metadata: model(ids, pos, pool.layers, metadata), backend, (None,),
                          sizes=(1,), max_blocks_per_request=MAX_BLOCKS, block_size=BLOCK_SIZE, device=DEVICE,
                          num_splits=lambda size: 1, api=ReplayingGraphs())
    graphs.capture_all()
    requests = states()
    query_lens = np.array([len(s.prompt_token_ids) for s in requests])
    eager(model, backend, pool, *prepare_inputs(requests, query_lens, BLOCK_SIZE))  # more tiles: the buffer grows
    token_ids, positions, layout = prepare_inputs(requests[:1], np.ones(1, dtype=np.int64), BLOCK_SIZE)
    with pytest.raises(RuntimeError, match=r"^the attention backend's step buffers moved since the graph of 1 rows "
                                           r"was captured \(block_tables, tiles\): its replay would read stale "
                                           r"memory$"):
        graphs.run(token_ids, positions, layout)


def test_reserved_buffers_never_move_and_refuse_a_bigger_step(tiny):
    arch, _, _ = tiny
    backend = TritonAttentionBackend(DEVICE, num_kv_heads=arch.num_kv_heads, num_sms=4)
    backend.reserve(max_num_tokens=32, max_num_reqs=4, max_blocks_per_request=MAX_BLOCKS, num_heads=arch.num_heads,
                    head_dim=arch.head_dim)
    requests = states()
    first = backend.plan(prepare_inputs(requests, np.array([5, 9, 3]), BLOCK_SIZE)[2], (None,))
    second = backend.plan(prepare_inputs(requests[:1], np.array([1]), BLOCK_SIZE)[2], (None,), num_splits=16)
    assert tensor_addresses(first) | {"slot_mapping": 0} == tensor_addresses(second) | {"slot_mapping": 0}
    five = [RequestState(f"b{i}", [10 + i], [], SamplingParams(), [i], 0) for i in range(5)]
    with pytest.raises(ValueError, match=r"^a step of 5 attention tiles, 5 requests x 1 blocks passes the sizes "
                                         r"reserved for CUDA graphs \(8, 4 x 8\)$"):
        backend.plan(prepare_inputs(five, np.ones(5, dtype=np.int64), BLOCK_SIZE)[2], (None,))
