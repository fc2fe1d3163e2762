"""Batch invariance in bf16 (ModelConfig.batch_invariant, on by default): a request's tokens are the same
alone as inside any batch, under any token budget (chunked prefill), from a cold or a warm prefix cache,
and after preemption; greedy and seeded sampling alike, on the AMX path and the portable (oneDNN) one.

Every comparison is exact, token for token. Engines are shared within the module (built once each).
"""

from __future__ import annotations

import pytest
import torch

from splitfuse.entrypoints.llm import LLM
from splitfuse.platforms import resolve_platform
from splitfuse.sampling_params import SamplingParams

MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
# Prompt lengths from 1 token to a few blocks past the smallest budget, so budgets 16 and 64 chunk them.
PROMPT_LENGTHS = [37, 1, 90, 15, 64, 8, 130, 23, 51, 3, 77, 16, 110, 29, 44, 9] * 4  # 64 prompts
# The requests also run alone: first, middle and last places in the batches below.
ALONE = [0, 1, 2, 6, 12, 31, 47, 63]

needs_cpu_kernels = pytest.mark.skipif(resolve_platform(torch.device("cpu"), torch.bfloat16).kernels is None,
                                       reason="no C compiler for the CPU kernels")
pytestmark = needs_cpu_kernels


def prompts_for(vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randint(10, vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def seeded(index: int) -> SamplingParams:
    return SamplingParams(temperature=0.8, seed=1000 + index, max_tokens=MAX_TOKENS, ignore_eos=True)


def token_ids(llm: LLM, prompts: list[list[int]], params) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


class Case:
    """One model's engines and reference outputs, built on first use and kept for the module."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.engines: dict[tuple, LLM] = {}
        self.reference = self.engine(enable_prefix_caching=False)
        self.prompts = prompts_for(self.reference.engine.vocab_size)
        self.greedy_alone = {i: token_ids(self.reference, [self.prompts[i]], GREEDY)[0] for i in ALONE}
        self.seeded_alone = {i: token_ids(self.reference, [self.prompts[i]], seeded(i))[0] for i in ALONE}

    def engine(self, **kwargs) -> LLM:
        key = tuple(sorted(kwargs.items()))
        if key not in self.engines:
            self.engines[key] = LLM(model=self.model, dtype="bfloat16", **kwargs)
        return self.engines[key]

    def assert_batch_matches(self, outputs: list[list[int]], indices: list[int], alone: dict[int, list[int]]
                             ) -> None:
        mismatched = [i for i, output in zip(indices, outputs) if i in alone and output != alone[i]]
        assert mismatched == [], f"requests {mismatched} differ from their run alone"


@pytest.fixture(scope="module", params=["demo", "smollm2"])
def case(request) -> Case:
    model = request.getfixturevalue("demo_ckpt" if request.param == "demo" else "smollm2_bf16_dir")
    return Case(model)


@pytest.mark.parametrize("budget, batch_size", [(16, 1), (16, 8), (64, 24), (512, 64), (2048, 40)])
def test_greedy_alone_equals_inside_batches_under_any_budget(case, budget, batch_size):
    llm = case.engine(max_num_batched_tokens=budget, enable_prefix_caching=False)
    indices = list(range(batch_size)) if batch_size > 1 else [6]  # alone at budget 16: the 130 tokens in 9 chunks
    outputs = token_ids(llm, [case.prompts[i] for i in indices], GREEDY)
    case.assert_batch_matches(outputs, indices, case.greedy_alone)


def test_seeded_sampling_alone_equals_inside_a_mixed_batch(case):
    # Seeded rows sample among greedy rows (every other request), under a budget that chunks prompts.
    llm = case.engine(max_num_batched_tokens=64, enable_prefix_caching=False)
    indices = list(range(48))
    params = [seeded(i) if i % 2 == 0 or i in ALONE else GREEDY for i in indices]
    outputs = token_ids(llm, [case.prompts[i] for i in indices], params)
    case.assert_batch_matches(outputs, indices, case.seeded_alone)


def test_warm_prefix_cache_gives_the_cold_tokens(case):
    llm = case.engine(max_num_batched_tokens=64)  # prefix caching on (the default)
    indices = list(range(16))
    prompts = [case.prompts[i] for i in indices]
    cold = token_ids(llm, prompts, GREEDY)
    hits_before = llm.engine.get_stats().prefix_cache_hits
    # Warm: the same prompts again, in another order, so each meets other neighbours and cached blocks.
    warm = token_ids(llm, prompts[::-1], GREEDY)[::-1]
    assert llm.engine.get_stats().prefix_cache_hits > hits_before
    case.assert_batch_matches(cold, indices, case.greedy_alone)
    assert warm == cold


def test_preempted_requests_give_the_tokens_they_give_alone(case):
    # 24 blocks of 16 tokens hold about three of these requests at once: the rest wait or are preempted.
    llm = case.engine(max_num_batched_tokens=64, num_gpu_blocks_override=24)
    indices = list(range(16))
    outputs = token_ids(llm, [case.prompts[i] for i in indices], GREEDY)
    assert llm.engine.get_stats().num_preemptions > 0
    case.assert_batch_matches(outputs, indices, case.greedy_alone)


def test_portable_path_without_amx_is_batch_invariant_too(case, monkeypatch):
    # SPLITFUSE_DISABLE_AMX is read when the platform is resolved (once an engine): linear layers go to
    # oneDNN in ROW_TILE calls, no fused decoder.
    monkeypatch.setenv("SPLITFUSE_DISABLE_AMX", "1")
    llm = LLM(model=case.model, dtype="bfloat16", max_num_batched_tokens=64, enable_prefix_caching=False)
    runner = llm.engine.engine_core.executor.runner
    assert not runner.platform.uses_amx and runner.model.cpu_decoder is None
    indices = list(range(24))
    alone = {i: token_ids(llm, [case.prompts[i]], GREEDY)[0] for i in (0, 2, 6, 12)}
    outputs = token_ids(llm, [case.prompts[i] for i in indices], GREEDY)
    case.assert_batch_matches(outputs, indices, alone)


def test_logprobs_alone_equal_inside_a_batch(case):
    # Not only the chosen tokens: the whole log-softmax row a request sees is the same bit for bit.
    llm = case.engine(max_num_batched_tokens=64, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    indices = [0, 2, 6, 12]

    def logprobs(prompts):
        return [o.outputs[0].logprobs for o in llm.generate(prompts, params, use_tqdm=False)]

    alone = [logprobs([case.prompts[i]])[0] for i in indices]
    batched = logprobs([case.prompts[i] for i in range(16)])
    assert [batched[i] for i in indices] == alone


def test_mixtral_experts_alone_equal_inside_a_batch(tmp_path, tiny_tokenizer):
    # Each expert sees a different number of tokens in every batch; in bf16 its matmuls run in fixed
    # 32-row calls (SparseMoE.row_tile), so a token's result does not depend on its neighbours. At this
    # width and a 2,048-token budget, experts get hundreds of rows a step, where oneDNN's rounding per
    # row changes with the row count: with row_tile None the logprobs below differ (checked).
    from splitfuse import checkpoint_factory

    config = checkpoint_factory.tiny_mixtral_config(hidden_size=256, intermediate_size=512, head_dim=64)
    path = checkpoint_factory.write_checkpoint(config, tmp_path / "mixtral", tokenizer=tiny_tokenizer,
                                               init_std=0.05)
    llm = LLM(model=path, dtype="bfloat16", max_num_batched_tokens=2048, enable_prefix_caching=False)
    assert {layer.mlp.row_tile for layer in llm.engine.engine_core.executor.runner.model.layers} == {32}
    prompts = prompts_for(llm.engine.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)

    def logprobs(batch):
        return [o.outputs[0].logprobs for o in llm.generate(batch, params, use_tqdm=False)]

    alone = {i: logprobs([prompts[i]])[0] for i in (0, 2, 6, 12)}
    batched = logprobs(prompts)
    assert {i: batched[i] for i in alone} == alone
