"""Parity with transformers: fp32 greedy tokens equal, logprobs within 1e-4, for every model family."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from splitfuse.attention.torch_native import TorchNativeBackend
from splitfuse.entrypoints.llm import LLM
from splitfuse.platforms import resolve_platform
from splitfuse.platforms.cpu.attention import CpuPagedBackend
from splitfuse.sampling_params import SamplingParams

NUM_NEW_TOKENS = 10
# Different lengths batched together; 40 > the tiny Mistral's 8-token window, and > budget 16.
PROMPT_LENGTHS = (3, 17, 40, 9)


def _prompts(vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1234)
    return [torch.randint(10, vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def _reference(path: str, prompts: list[list[int]]):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens, logprobs = [], []
    for prompt in prompts:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NUM_NEW_TOKENS, min_new_tokens=NUM_NEW_TOKENS,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        new_tokens = out.sequences[0, len(prompt):].tolist()
        step_logprobs = [torch.log_softmax(step[0].float(), -1) for step in out.logits]
        tokens.append(new_tokens)
        logprobs.append(step_logprobs)
    return tokens, logprobs


@pytest.fixture(scope="module")
def params():
    return SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=3)


@pytest.mark.parametrize("kernels", ["cpu-kernels", "torch-ops"])
def test_greedy_tokens_and_logprobs_match_transformers(family_ckpt, params, kernels, monkeypatch):
    if kernels == "torch-ops":  # the fallback where no C compiler is found, and the path CUDA takes
        monkeypatch.setenv("SPLITFUSE_DISABLE_CPU_KERNELS", "1")
    elif resolve_platform(torch.device("cpu"), torch.float32).kernels is None:
        pytest.skip("no C compiler for the CPU kernels")
    llm = LLM(model=family_ckpt, dtype="float32", max_num_batched_tokens=16, block_size=4)
    expected_backend = CpuPagedBackend if kernels == "cpu-kernels" else TorchNativeBackend
    assert type(llm.engine.engine_core.executor.runner.backend) is expected_backend
    prompts = _prompts(llm.engine.vocab_size)
    ref_tokens, ref_logprobs = _reference(family_ckpt, prompts)

    outputs = llm.generate(prompts, params, use_tqdm=False)

    assert [o.outputs[0].token_ids for o in outputs] == ref_tokens
    for output, expected in zip(outputs, ref_logprobs):
        for position, (entry, reference) in enumerate(zip(output.outputs[0].logprobs, expected)):
            chosen = output.outputs[0].token_ids[position]
            assert entry[chosen].rank == 1
            top3 = torch.topk(reference, 3)
            assert list(entry)[:1] == [chosen]
            assert sorted(entry) == sorted(set(top3.indices.tolist()) | {chosen})
            for token_id, logprob in entry.items():
                assert logprob.logprob == pytest.approx(reference[token_id].item(), abs=1e-4)
    assert llm.engine.engine_core.scheduler.kv_cache.num_free_blocks == llm.engine.engine_core.scheduler.kv_cache.num_blocks


def test_prefix_caching_on_and_off_give_identical_tokens(family_ckpt):
    prompts = _prompts(512)
    shared = prompts[2]
    # Requests over a shared 40-token prefix, run one after another so later ones hit the cache.
    prompts = [shared + p[:5] for p in prompts] + [shared]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    results = {}
    for caching in (True, False):
        llm = LLM(model=family_ckpt, dtype="float32", max_num_batched_tokens=16, block_size=4,
                  enable_prefix_caching=caching)
        results[caching] = [llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
        hits = llm.engine.engine_core.scheduler.kv_cache.prefix_cache_hits
        assert (hits > 0) == caching
    assert results[True] == results[False]


def test_sharded_checkpoint_loads_like_the_single_file(llama_ckpt, llama_sharded_ckpt):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = _prompts(512)
    single = LLM(model=llama_ckpt, dtype="float32").generate(prompts, params, use_tqdm=False)
    sharded = LLM(model=llama_sharded_ckpt, dtype="float32").generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in single] == [o.outputs[0].token_ids for o in sharded]
