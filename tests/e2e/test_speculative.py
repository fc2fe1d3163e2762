"""Speculative decoding (n-gram prompt lookup) end to end: greedy output token-identical to plain decoding
for every family, with the prefix cache, under preemption and with n > 1; drafts really proposed and
accepted (the counters say so); sampled output exactly distributed as the target (toy vocabulary).

bf16 on the CPU kernels is batch invariant: a token computed inside a multi-token query (a draft being
verified) is bit-identical to the same token decoded alone, which greedy identity relies on.
"""

from __future__ import annotations

import collections

import pytest
import torch

from splitfuse.entrypoints.llm import LLM
from splitfuse.sample.sampler import Sampler, SamplingRow
from splitfuse.sampling_params import SamplingParams
from splitfuse.worker.model_runner import accepted_drafts

pytestmark = pytest.mark.timeout(600)

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def repetitive_prompts(vocab_size: int) -> list[list[int]]:
    """Prompts whose token patterns repeat, so the n-gram proposer finds drafts from the first step."""
    generator = torch.Generator().manual_seed(4)
    prompts = []
    for length, repeats in ((7, 4), (12, 3), (5, 6), (20, 2)):
        pattern = torch.randint(10, vocab_size, (length,), generator=generator).tolist()
        prompts.append(pattern * repeats)
    return prompts


def token_ids(llm: LLM, prompts, params) -> list[list[int]]:
    return [list(c.token_ids) for o in llm.generate(prompts, params, use_tqdm=False) for c in o.outputs]


def speculation(llm: LLM):
    return llm.engine.engine_core.scheduler.speculator.stats


def test_greedy_output_is_identical_to_plain_decoding_for_every_family(family_ckpt):
    plain = LLM(model=family_ckpt, dtype="bfloat16")
    prompts = repetitive_prompts(plain.engine.vocab_size)
    expected = token_ids(plain, prompts, GREEDY)
    # 1-grams too: a random model rarely goes on with a prompt's pattern, but it repeats its own tokens.
    spec = LLM(model=family_ckpt, dtype="bfloat16", speculative_method="ngram", num_speculative_tokens=5,
               prompt_lookup_min=1)
    assert token_ids(spec, prompts, GREEDY) == expected
    stats = speculation(spec)
    assert stats.draft_tokens > 0 and stats.steps > 0
    kv_cache = spec.engine.engine_core.scheduler.kv_cache
    assert kv_cache.num_free_blocks == kv_cache.num_blocks


@pytest.fixture(scope="module")
def demo_pair(demo_ckpt):
    """The demo model (its greedy output repeats itself, so drafts get accepted), plain and speculating."""
    plain = LLM(model=demo_ckpt, dtype="bfloat16", block_size=4)
    spec = LLM(model=demo_ckpt, dtype="bfloat16", block_size=4, speculative_method="ngram")
    return plain, spec


def test_drafts_are_accepted_and_the_prefix_cache_holds_only_real_tokens(demo_pair):
    plain, spec = demo_pair
    prompts = repetitive_prompts(plain.engine.vocab_size)
    expected = token_ids(plain, prompts, GREEDY)
    before = speculation(spec).accepted_tokens
    assert token_ids(spec, prompts, GREEDY) == expected
    assert speculation(spec).accepted_tokens > before
    # Every block speculation entered into the prefix cache holds accepted tokens only: the same prompts
    # continued by their outputs hit exactly the blocks plain decoding would have cached.
    followups = [p + e[:-1] for p, e in zip(prompts, expected)]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    hits = [o.num_cached_tokens for o in spec.generate(followups, params, use_tqdm=False)]
    plain_hits = [o.num_cached_tokens for o in plain.generate(followups, params, use_tqdm=False)]
    assert hits == plain_hits and min(hits) > 0
    assert token_ids(spec, followups, params) == token_ids(plain, followups, params)


def test_under_preemption_and_with_n_choices_greedy_stays_identical(demo_ckpt, demo_pair):
    plain, _ = demo_pair
    prompts = repetitive_prompts(plain.engine.vocab_size)
    expected = token_ids(plain, prompts, GREEDY)
    # A pool too small for all four at once: requests are preempted and recomputed midway.
    small = LLM(model=demo_ckpt, dtype="bfloat16", block_size=4, num_gpu_blocks_override=40,
                max_num_batched_tokens=32, speculative_method="ngram")
    assert token_ids(small, prompts, GREEDY) == expected
    assert small.engine.get_stats().num_preemptions > 0 and speculation(small).draft_tokens > 0
    n3 = SamplingParams(n=3, temperature=0, max_tokens=24, ignore_eos=True)
    assert token_ids(small, prompts[:2], n3) == token_ids(plain, prompts[:2], n3)


def test_seeded_sampling_with_drafts_is_reproducible(demo_pair):
    _, spec = demo_pair
    prompts = repetitive_prompts(spec.engine.vocab_size)
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=32, ignore_eos=True)
    assert token_ids(spec, prompts, params) == token_ids(spec, prompts, params)


def test_a_big_batch_speculates_not_at_all(demo_ckpt):
    spec = LLM(model=demo_ckpt, dtype="bfloat16", speculative_method="ngram", speculative_max_batch=2)
    prompts = repetitive_prompts(spec.engine.vocab_size)
    token_ids(spec, prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert speculation(spec).draft_tokens == 0  # four requests ran together the whole time
    token_ids(spec, prompts[:1], GREEDY)
    assert speculation(spec).draft_tokens > 0


def test_rejection_sampling_keeps_the_target_distribution_on_a_toy_vocabulary():
    """Draft d after the last token: position 0's target p0, position 1's (given d) p1. Over many trials the
    first token is distributed as p0, and the token after an accepted d as p1."""
    p0 = torch.tensor([0.1, 0.5, 0.15, 0.25])
    p1 = torch.tensor([0.4, 0.05, 0.35, 0.2])
    draft = [1]
    sampler = Sampler(vocab_size=4, eos_token_ids=[99], seed=123)
    logits = torch.stack([p0.log(), p1.log()])
    params = SamplingParams(temperature=1.0)
    rows = [SamplingRow(params, [0], []), SamplingRow(params, [0], draft)]
    first, second = collections.Counter(), collections.Counter()
    trials = 20000
    for _ in range(trials):
        drawn = sampler(logits.clone(), rows).token_ids
        kept = drawn[:1 + accepted_drafts(draft, drawn)]
        first[kept[0]] += 1
        if len(kept) == 2:
            second[kept[1]] += 1
    observed0 = torch.tensor([first[t] / trials for t in range(4)])
    assert torch.allclose(observed0, p0, atol=0.015), observed0
    accepted = sum(second.values())
    assert abs(accepted / trials - p0[1]) < 0.015  # the draft is accepted with probability p0(d)
    observed1 = torch.tensor([second[t] / accepted for t in range(4)])
    assert torch.allclose(observed1, p1, atol=0.025), observed1


def test_the_server_speculates_and_counts_drafts_in_prometheus(demo_ckpt, demo_pair):
    import httpx
    import openai

    from splitfuse.config import EngineConfig
    from splitfuse.engine.async_engine import AsyncLLMEngine
    from splitfuse.entrypoints.openai.server import ServerThread, build_app
    from splitfuse.metrics.prometheus import parse_metrics

    plain, _ = demo_pair
    prompt = repetitive_prompts(plain.engine.vocab_size)[0]
    expected = plain.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].text
    engine = AsyncLLMEngine.from_config(EngineConfig.from_kwargs(model=demo_ckpt, dtype="bfloat16", block_size=4,
                                                                 speculative_method="ngram"))
    with ServerThread(build_app(engine, ["demo"])) as server:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
            reply = client.completions.create(model="demo", prompt=prompt, temperature=0, max_tokens=40,
                                              extra_body={"ignore_eos": True})
        metrics = parse_metrics(httpx.get(server.url + "/metrics").text)
    assert reply.choices[0].text == expected
    drafts = metrics["splitfuse:spec_decode_num_draft_tokens_total"]
    accepted = metrics["splitfuse:spec_decode_num_accepted_tokens_total"]
    assert drafts > 0 and 0 < accepted <= drafts
