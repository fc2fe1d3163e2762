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
