"""The engine on CUDA: same greedy tokens as on CPU (fp32), bf16 runs, blocks all freed. Skipped without CUDA."""

import pytest
import torch

from splitfuse.entrypoints.llm import LLM
from splitfuse.sampling_params import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts():
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(10, 512, (n,), generator=generator).tolist() for n in (4, 19, 40)]


def test_cuda_greedy_matches_cpu(family_ckpt):
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = LLM(model=family_ckpt, dtype="float32", device="cpu", max_num_batched_tokens=16, block_size=4)
    cuda = LLM(model=family_ckpt, dtype="float32", device="cuda", max_num_batched_tokens=16, block_size=4)
    expected = [o.outputs[0].token_ids for o in cpu.generate(prompts(), PARAMS, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in cuda.generate(prompts(), PARAMS, use_tqdm=False)]
    assert got == expected
    stats = cuda.engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_cuda_bf16_runs_with_sampling(llama_ckpt):
    llm = LLM(model=llama_ckpt, dtype="bfloat16", device="cuda")
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=1, max_tokens=16, ignore_eos=True, n=2)
    outputs = llm.generate(prompts(), params, use_tqdm=False)
    assert all(len(c.token_ids) == 16 for o in outputs for c in o.outputs)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_greedy_matches_transformers_for_every_family(family_ckpt, backend):
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    llm = LLM(model=family_ckpt, dtype="float32", device="cuda", attention_backend=backend,
              max_num_batched_tokens=16, block_size=4)
    reference = AutoModelForCausalLM.from_pretrained(family_ckpt, dtype=torch.float32).eval()
    expected = []
    for prompt in prompts():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                 pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    got = [o.outputs[0].token_ids for o in llm.generate(prompts(), PARAMS, use_tqdm=False)]
    assert got == expected


def test_cuda_graph_replay_gives_the_eager_tokens(llama_ckpt):
    torch.backends.cuda.matmul.allow_tf32 = False
    kwargs = dict(model=llama_ckpt, dtype="float32", device="cuda", attention_backend="triton", max_num_seqs=8)
    eager = LLM(enforce_eager=True, **kwargs)
    graphed = LLM(**kwargs)
    runner = graphed.engine.engine_core.executor.runner
    assert eager.engine.engine_core.executor.runner.graphs is None and runner.graphs.sizes == (1, 2, 4, 8)
    expected = [o.outputs[0].token_ids for o in eager.generate(prompts(), PARAMS, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in graphed.generate(prompts(), PARAMS, use_tqdm=False)]
    assert got == expected
    assert runner.graphs.num_replays >= PARAMS.max_tokens - 1  # every decode-only step replayed a graph


def test_the_kv_pool_is_sized_from_gpu_memory(llama_ckpt):
    llm = LLM(model=llama_ckpt, device="cuda", gpu_memory_utilization=0.3)
    runner = llm.engine.engine_core.executor.runner
    free, total = torch.cuda.mem_get_info()
    pool_bytes = runner.num_blocks * runner.kv_store.bytes_per_block
    assert 0 < pool_bytes <= 0.3 * total
    assert llm.engine.get_stats().num_total_blocks == runner.num_blocks
