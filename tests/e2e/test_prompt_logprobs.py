"""prompt_logprobs: each prompt token's logprob given the tokens before it, against transformers on the same
fp32 weights — across prefill chunks, with the prefix cache, under preemption, with n > 1, and through
the legacy completions API's ``echo`` + ``logprobs``."""

from __future__ import annotations

import openai
import pytest
import torch
import transformers

from splitfuse.config import EngineConfig
from splitfuse.engine.async_engine import AsyncLLMEngine
from splitfuse.entrypoints.llm import LLM
from splitfuse.entrypoints.openai.server import ServerThread, build_app
from splitfuse.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(600)

NUM_TOP = 3


@pytest.fixture(scope="module")
def prompt(llama_ckpt) -> list[int]:
    return torch.randint(5, 500, (45,), generator=torch.Generator().manual_seed(8)).tolist()


@pytest.fixture(scope="module")
def reference(llama_ckpt, prompt) -> torch.Tensor:
    """transformers' log-softmax at every prompt position [P, vocab]."""
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_ckpt, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def assert_matches(prompt_logprobs, prompt: list[int], reference: torch.Tensor) -> None:
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for position in range(1, len(prompt)):
        entries = prompt_logprobs[position]
        token = prompt[position]
        expected = reference[position - 1]
        assert list(entries)[0] == token  # the prompt's own token first, then the top ones
        assert entries[token].logprob == pytest.approx(expected[token].item(), abs=1e-4)
        assert entries[token].rank == int((expected > expected[token]).sum()) + 1
        top = sorted((t for t in entries if entries[t].rank <= NUM_TOP), key=lambda t: entries[t].rank)
        assert top == expected.topk(NUM_TOP).indices.tolist()


PARAMS = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=NUM_TOP)


def test_chunked_prefill_scores_every_prompt_token_like_transformers(llama_ckpt, prompt, reference):
    llm = LLM(model=llama_ckpt, dtype="float32", max_num_batched_tokens=16, block_size=4)  # 45 tokens: 3 chunks
    output = llm.generate(prompt, PARAMS, use_tqdm=False)[0]
    assert_matches(output.prompt_logprobs, prompt, reference)
    # Again: the prompt's blocks are cached, but a prompt to be scored is computed anyway.
    again = llm.generate(prompt, PARAMS, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0
    assert_matches(again.prompt_logprobs, prompt, reference)
    # Without prompt_logprobs the cache serves it, and no prompt logprobs come back.
    plain = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    assert plain.num_cached_tokens == 44 and plain.prompt_logprobs is None
    # n > 1: the prompt is scored once, for the request.
    n2 = llm.generate(prompt, SamplingParams(n=2, temperature=0, max_tokens=2, prompt_logprobs=NUM_TOP),
                      use_tqdm=False)[0]
    assert len(n2.outputs) == 2
    assert_matches(n2.prompt_logprobs, prompt, reference)


def test_under_preemption_each_prompt_token_is_scored_once(llama_ckpt, prompt, reference):
    # Room for about one request: the two preempt each other midway and compute their prompts again.
    small = LLM(model=llama_ckpt, dtype="float32", max_num_batched_tokens=16, block_size=4,
                num_gpu_blocks_override=20)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=NUM_TOP)
    outputs = small.generate([prompt, prompt[::-1]], params, use_tqdm=False)
    assert small.engine.get_stats().num_preemptions > 0
    assert_matches(outputs[0].prompt_logprobs, prompt, reference)
    assert len(outputs[1].prompt_logprobs) == len(prompt)


def test_echo_with_logprobs_scores_the_prompt_through_the_server(llama_ckpt, prompt, reference):
    engine = AsyncLLMEngine.from_config(EngineConfig.from_kwargs(model=llama_ckpt, dtype="float32"))
    with ServerThread(build_app(engine, ["tiny"])) as server:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
            reply = client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=2, max_tokens=1,
                                              temperature=0)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.token_logprobs) == len(prompt) + 1 and logprobs.token_logprobs[0] is None
    expected = [reference[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert logprobs.token_logprobs[1:len(prompt)] == pytest.approx(expected, abs=1e-4)
    for position in range(1, len(prompt)):  # OpenAI lists the token itself among the top ones
        top = logprobs.top_logprobs[position]
        assert top[logprobs.tokens[position]] == logprobs.token_logprobs[position] and 1 <= len(top) <= 3
