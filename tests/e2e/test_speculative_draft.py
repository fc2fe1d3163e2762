"""Speculative decoding with a draft model end to end: greedy output token-identical to plain decoding (two
families, with the prefix cache, under preemption, with n > 1); the target as its own draft accepts every
draft, greedy and sampled; the general rejection sampler keeps the target distribution (toy vocabulary);
a draft with another vocabulary is refused at engine start.

bf16 on the CPU kernels is batch invariant, which greedy identity relies on (tests/e2e/test_speculative.py).
"""

from __future__ import annotations

import collections
import json
import os
import shutil

import pytest
import torch

from splitfuse import checkpoint_factory
from splitfuse.entrypoints.llm import LLM
from splitfuse.sample.rejection import rejection_sample
from splitfuse.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(600)

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def small_draft_ckpt(tmp_path_factory, tiny_tokenizer) -> str:
    """A llama half the tiny one's size (one layer, hidden 32) with the same tokenizer, other weights (seed 1)."""
    config = checkpoint_factory.tiny_llama_config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=2, num_key_value_heads=1)
    return checkpoint_factory.write_checkpoint(config, tmp_path_factory.mktemp("draft_ckpt"),
                                               tokenizer=tiny_tokenizer, seed=1,
                                               init_std=checkpoint_factory.TINY_INIT_STD)


def prompts_of(vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(10, vocab_size, (length,), generator=generator).tolist() for length in (5, 13, 30, 9)]


def token_ids(llm: LLM, prompts, params) -> list[list[int]]:
    return [list(c.token_ids) for o in llm.generate(prompts, params, use_tqdm=False) for c in o.outputs]


def speculation(llm: LLM):
    return llm.engine.engine_core.scheduler.speculator.stats


@pytest.mark.parametrize("target", ["llama_ckpt", "mistral_ckpt", "qwen3_ckpt"])
def test_greedy_output_is_identical_to_plain_decoding(request, target, small_draft_ckpt):
    target_ckpt = request.getfixturevalue(target)
    plain = LLM(model=target_ckpt, dtype="bfloat16", block_size=4)
    prompts = prompts_of(plain.engine.vocab_size)
    expected = token_ids(plain, prompts, GREEDY)
    spec = LLM(model=target_ckpt, dtype="bfloat16", block_size=4, speculative_method="draft",
               speculative_model=small_draft_ckpt, num_speculative_tokens=3)
    assert token_ids(spec, prompts, GREEDY) == expected
    stats = speculation(spec)
    assert stats.draft_tokens > 0 and stats.steps > 0
    # The same prompts again hit the prefix cache: the target's KV is there, the draft computes its own.
    again = token_ids(spec, prompts, GREEDY)
    assert again == expected
    kv_cache = spec.engine.engine_core.scheduler.kv_cache
    assert kv_cache.num_free_blocks == kv_cache.num_blocks


def test_the_target_as_its_own_draft_accepts_every_greedy_draft_under_preemption_and_with_n(llama_ckpt):
    plain = LLM(model=llama_ckpt, dtype="bfloat16", block_size=4)
    prompts = prompts_of(plain.engine.vocab_size)
    expected = token_ids(plain, prompts, GREEDY)
    # A pool too small for all four at once: requests are preempted and recomputed midway (the draft too).
    small = LLM(model=llama_ckpt, dtype="bfloat16", block_size=4, num_gpu_blocks_override=30,
                max_num_batched_tokens=32, speculative_method="draft", speculative_model=llama_ckpt)
    assert token_ids(small, prompts, GREEDY) == expected
    stats = speculation(small)
    assert small.engine.get_stats().num_preemptions > 0
    assert stats.draft_tokens > 0 and stats.accepted_tokens == stats.draft_tokens
    n3 = SamplingParams(n=3, temperature=0, max_tokens=24, ignore_eos=True)
    assert token_ids(small, prompts[:2], n3) == token_ids(plain, prompts[:2], n3)
    assert stats.accepted_tokens == stats.draft_tokens


@pytest.fixture(scope="module")
def near_draft_ckpt(tmp_path_factory, tiny_tokenizer) -> str:
    """The tiny llama's weights drawn with a smaller std (same seed): a draft that agrees with it often, not always."""
    return checkpoint_factory.write_checkpoint(checkpoint_factory.tiny_llama_config(),
                                               tmp_path_factory.mktemp("near_draft_ckpt"), tokenizer=tiny_tokenizer,
                                               init_std=0.8 * checkpoint_factory.TINY_INIT_STD)


def test_a_draft_that_agrees_often_is_partly_accepted_greedy_and_sampled(llama_ckpt, near_draft_ckpt):
    plain = LLM(model=llama_ckpt, dtype="bfloat16")
    spec = LLM(model=llama_ckpt, dtype="bfloat16", speculative_method="draft", speculative_model=near_draft_ckpt)
    prompts = prompts_of(spec.engine.vocab_size)
    assert token_ids(spec, prompts, GREEDY) == token_ids(plain, prompts, GREEDY)
    stats = speculation(spec)
    assert 0 < stats.accepted_tokens < stats.draft_tokens, stats
    greedy_drafts = stats.draft_tokens
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=32, ignore_eos=True)
    assert token_ids(spec, prompts, params) == token_ids(spec, prompts, params)  # seeded: reproducible
    assert stats.draft_tokens > greedy_drafts


def test_sampled_drafts_of_the_target_itself_all_stand_through_the_general_rule(llama_ckpt):
    """p == q at every position (same model, same processing: penalties over the drafts before, top-k,
    top-p, temperature), so min(1, p/q) = 1: a mismatch between the two sides' processing would reject (a
    negative presence penalty makes the drafts before a position matter)."""
    spec = LLM(model=llama_ckpt, dtype="bfloat16", speculative_method="draft", speculative_model=llama_ckpt)
    params = SamplingParams(n=2, temperature=0.5, top_k=40, top_p=0.95, presence_penalty=-2.0,
                            repetition_penalty=1.2, max_tokens=64, ignore_eos=True, logprobs=2)
    outputs = spec.generate(prompts_of(spec.engine.vocab_size), params, use_tqdm=False)
    stats = speculation(spec)
    assert stats.draft_tokens > 0 and stats.accepted_tokens == stats.draft_tokens
    assert all(len(c.token_ids) == 64 and len(c.logprobs) == 64 for o in outputs for c in o.outputs)


def test_rejection_sampling_keeps_the_target_distribution_on_a_toy_vocabulary():
    """Two drafts from a q unlike p (q puts mass where p has none): over many trials the first token is
    distributed as p_0, the second (after an accepted d_1) as p_1, the bonus (both accepted) as p_2, and d_1
    stands with probability sum(min(p_0, q_0))."""
    p = torch.tensor([[0.1, 0.5, 0.15, 0.25, 0.0],
                      [0.4, 0.05, 0.35, 0.2, 0.0],
                      [0.0, 0.3, 0.3, 0.2, 0.2]])
    q = torch.tensor([[0.3, 0.1, 0.2, 0.1, 0.3],
                      [0.1, 0.6, 0.1, 0.1, 0.1]])
    generator = torch.Generator().manual_seed(5)
    counts = [collections.Counter() for _ in range(3)]
    trials = 20000
    first_accepted = 0
    for _ in range(trials):
        drafts = [int(torch.multinomial(q[j], 1, generator=generator)) for j in range(2)]
        kept = rejection_sample(p, q, drafts, generator)
        assert 1 <= len(kept) <= 3 and kept[:-1] == drafts[:len(kept) - 1]
        first_accepted += len(kept) > 1
        for position, token in enumerate(kept):
            counts[position][token] += 1
    for position in range(3):
        total = sum(counts[position].values())
        observed = torch.tensor([counts[position][t] / total for t in range(5)])
        assert torch.allclose(observed, p[position], atol=0.02), (position, observed)
    assert abs(first_accepted / trials - float(torch.minimum(p[0], q[0]).sum())) < 0.015
    assert counts[0][4] == 0  # p_0 has no mass on token 4, q_0 has 0.3: never output


def test_a_draft_with_another_vocabulary_is_refused_at_engine_start(llama_ckpt, small_draft_ckpt, tmp_path):
    other = str(tmp_path / "other_vocab")
    shutil.copytree(small_draft_ckpt, other)
    with open(os.path.join(other, "config.json")) as f:
        config = json.load(f)
    config["vocab_size"] = 300
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="has a vocabulary of 300 tokens, the target 512: a draft model must"):
        LLM(model=llama_ckpt, speculative_method="draft", speculative_model=other)


def test_splitfuse_serve_speculates_with_a_draft_model_given_by_flags(llama_ckpt):
    import httpx
    import openai

    from server_process import serve_process
    from splitfuse.metrics.prometheus import parse_metrics

    prompt = prompts_of(checkpoint_factory.TINY_VOCAB_SIZE)[2]
    expected = LLM(model=llama_ckpt, dtype="bfloat16").generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].text
    # The target as its own draft: every greedy draft must stand.
    with serve_process(llama_ckpt, "--dtype", "bfloat16", "--served-model-name", "tiny", "--speculative-method",
                       "draft", "--speculative-model", llama_ckpt, timeout_s=180) as url:
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
            reply = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=40,
                                              extra_body={"ignore_eos": True})
        metrics = parse_metrics(httpx.get(url + "/metrics").text)
    assert reply.choices[0].text == expected
    drafts = metrics["splitfuse:spec_decode_num_draft_tokens_total"]
    assert drafts > 0 and metrics["splitfuse:spec_decode_num_accepted_tokens_total"] == drafts
