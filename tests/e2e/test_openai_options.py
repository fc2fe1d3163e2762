"""OpenAI options through the server with the official openai client: best_of, stream usage on every streaming
path (include_usage, continuous_usage_stats), and logit_bias and seed on chat.

Engine: the tiny fp32 Llama; references come from the offline ``LLM`` on the same checkpoint, or from
counts the client can make itself (a logprob entry per generated token).
"""

from __future__ import annotations

import openai
import pytest

from splitfuse.config import EngineConfig
from splitfuse.engine.async_engine import AsyncLLMEngine
from splitfuse.entrypoints.llm import LLM
from splitfuse.entrypoints.openai.server import ServerThread, build_app
from splitfuse.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny-llama"
PROMPT = "The quick brown fox"
OTHER_PROMPT = "Hello there"
MESSAGES = [{"role": "user", "content": "Say hello."}]
USAGE = {"include_usage": True}
# A named tool whose arguments the grammar pins down to {"unit": "c"} or {"unit": "f"}: the reply always ends.
TOOLS = [{"type": "function", "function": {"name": "pick", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"]}}}]
PICK = {"type": "function", "function": {"name": "pick"}}


@pytest.fixture(scope="module")
def server(llama_ckpt):
    engine = AsyncLLMEngine.from_config(EngineConfig.from_kwargs(model=llama_ckpt, dtype="float32"))
    with ServerThread(build_app(engine, [MODEL])) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as api:
        yield api


@pytest.fixture(scope="module")
def offline(llama_ckpt):
    return LLM(model=llama_ckpt, dtype="float32")


def num_tokens(offline: LLM, text: str) -> int:
    return len(offline.tokenizer.encode(text))


def tokens_to_stop(offline: LLM, prompt, stop: str, **kwargs) -> int:
    """How many greedy tokens it takes until the text holds ``stop`` (decoded here, not by the engine)."""
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, **kwargs)
    token_ids = offline.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    return next(k for k in range(1, len(token_ids) + 1) if stop in offline.tokenizer.decode(token_ids[:k]))


def greedy_text(offline: LLM, prompt, max_tokens: int) -> str:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return offline.generate(prompt, params, use_tqdm=False)[0].outputs[0].text


def error_of(call) -> tuple[str, str]:
    with pytest.raises(openai.BadRequestError) as failure:
        call()
    return failure.value.body["message"], failure.value.body["param"]


# ----- best_of ------------------------------------------------------------------------------


def sampled(client, **kwargs):
    return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5,
                                     extra_body={"ignore_eos": True, **kwargs.pop("extra_body", {})}, **kwargs)


def test_best_of_returns_the_n_sequences_of_the_highest_cumulative_logprob(client):
    # The same 4 seeded sequences (sequence i draws with seed + i), all returned with their logprobs.
    four = sampled(client, n=4, logprobs=0)
    sums = [sum(c.logprobs.token_logprobs) for c in four.choices]
    ranked = sorted(range(4), key=lambda i: -sums[i])
    assert ranked[:2] != [0, 1]  # else returning the first n would pass too
    best = sampled(client, n=2, extra_body={"best_of": 4})
    assert [c.index for c in best.choices] == [0, 1]
    assert [c.text for c in best.choices] == [four.choices[i].text for i in ranked[:2]]
    assert [c.logprobs for c in best.choices] == [None, None]  # none asked for, none returned
    assert (best.usage.prompt_tokens, best.usage.completion_tokens) == (four.usage.prompt_tokens, 32)
    assert [c.text for c in sampled(client, n=2, extra_body={"best_of": 4}).choices] == \
        [c.text for c in best.choices]  # seeded: the same pick again

    with_logprobs = sampled(client, n=1, logprobs=1, extra_body={"best_of": 4})
    (choice,) = with_logprobs.choices
    assert choice.text == four.choices[ranked[0]].text
    assert choice.logprobs.token_logprobs == four.choices[ranked[0]].logprobs.token_logprobs


def test_best_of_with_several_prompts_indexes_choices_per_prompt(client, offline):
    response = client.completions.create(model=MODEL, prompt=[PROMPT, OTHER_PROMPT], max_tokens=4, temperature=0,
                                         extra_body={"best_of": 3, "ignore_eos": True})
    # Greedy: the three sequences of a prompt are alike, so the pick is the greedy text.
    assert [(c.index, c.text) for c in response.choices] == [(0, greedy_text(offline, PROMPT, 4)),
                                                             (1, greedy_text(offline, OTHER_PROMPT, 4))]
    assert response.usage.completion_tokens == 2 * 3 * 4
    assert response.usage.prompt_tokens == num_tokens(offline, PROMPT) + num_tokens(offline, OTHER_PROMPT)


def test_offline_best_of_picks_the_best_of_the_same_seeded_sequences(offline):
    params = dict(max_tokens=6, seed=11, ignore_eos=True)
    three = offline.generate(PROMPT, SamplingParams(n=3, logprobs=0, **params), use_tqdm=False)[0].outputs
    best_one = max(three, key=lambda c: c.cumulative_logprob)  # max takes the first of ties, as best_of does
    assert best_one.index != 0  # else returning the first would pass too
    (output,) = offline.generate(PROMPT, SamplingParams(n=1, best_of=3, **params), use_tqdm=False)
    (completion,) = output.outputs
    assert (completion.index, completion.text, completion.token_ids) == (0, best_one.text, best_one.token_ids)
    assert (completion.logprobs, completion.cumulative_logprob) == (None, None)
    assert output.metrics.num_discarded_tokens == 12
    (with_logprobs,) = offline.generate(PROMPT, SamplingParams(n=1, best_of=3, logprobs=0, **params),
                                        use_tqdm=False)[0].outputs
    assert with_logprobs.cumulative_logprob == best_one.cumulative_logprob


def test_best_of_refusals_name_best_of(client):
    def create(**kwargs):
        return lambda: client.completions.create(model=MODEL, prompt=kwargs.pop("prompt", PROMPT), max_tokens=2,
                                                 **kwargs)

    assert error_of(create(n=2, extra_body={"best_of": 1})) == ("best_of must be between n (2) and 128, got 1",
                                                                "best_of")
    assert error_of(create(extra_body={"best_of": 129})) == ("best_of must be between n (1) and 128, got 129",
                                                             "best_of")
    assert error_of(create(prompt=[PROMPT, PROMPT], extra_body={"best_of": 100})) == (
        "best_of x prompts = 100 x 2 = 200 choices; at most 128 are allowed per request", "best_of")
    assert error_of(create(stream=True, extra_body={"best_of": 2})) == (
        "best_of cannot be streamed: which choices are best is known only at the end", "best_of")
    # best_of == n picks nothing: it is plain n, and it streams.
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, n=2, stream=True,
                                            extra_body={"best_of": 2, "ignore_eos": True}, stream_options=USAGE))
    assert chunks[-1].usage.completion_tokens == 4


# ----- stream usage: completions -------------------------------------------------------------


def test_completion_stream_usage_with_n_and_several_prompts(client, offline):
    chunks = list(client.completions.create(model=MODEL, prompt=[PROMPT, OTHER_PROMPT], max_tokens=5, n=2,
                                            temperature=1.0, stream=True, stream_options=USAGE,
                                            extra_body={"ignore_eos": True}))
    assert sorted({c.index for chunk in chunks for c in chunk.choices}) == [0, 1, 2, 3]
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    # Each prompt counts once, however many choices it has; every choice's tokens count.
    assert usage.prompt_tokens == num_tokens(offline, PROMPT) + num_tokens(offline, OTHER_PROMPT)
    assert (usage.completion_tokens, usage.total_tokens) == (2 * 2 * 5, usage.prompt_tokens + 20)


def test_completion_stream_usage_with_echo_counts_the_prompt_once(client, offline):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                            stream=True, stream_options=USAGE, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == PROMPT + greedy_text(offline, PROMPT, 4)
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (num_tokens(offline, PROMPT), 4)


def test_completion_stream_usage_with_logprobs_matches_the_tokens_streamed(client):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                            stream=True, stream_options=USAGE))
    streamed = [t for chunk in chunks for c in chunk.choices for t in c.logprobs.tokens]
    assert chunks[-1].usage.completion_tokens == len(streamed) and 1 <= len(streamed) <= 6


def test_completion_stream_ended_by_a_stop_string_counts_the_tokens_up_to_it(client, offline):
    full = greedy_text(offline, PROMPT, 24)
    stop = full[8:10]
    expected_tokens = tokens_to_stop(offline, PROMPT, stop)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                            stream=True, stream_options=USAGE, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full[:full.index(stop)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == expected_tokens < 24


def test_continuous_usage_stats_put_the_usage_so_far_in_every_completion_chunk(client, offline):
    chunks = list(client.completions.create(
        model=MODEL, prompt=[PROMPT, OTHER_PROMPT], max_tokens=4, n=2, temperature=1.0, logprobs=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True}))
    prompt_tokens = num_tokens(offline, PROMPT) + num_tokens(offline, OTHER_PROMPT)
    seen = 0
    for chunk in chunks:
        seen += sum(len(c.logprobs.tokens) for c in chunk.choices)  # one entry per generated token
        assert (chunk.usage.prompt_tokens, chunk.usage.completion_tokens) == (prompt_tokens, seen)
        assert chunk.usage.total_tokens == prompt_tokens + seen
    assert chunks[-1].choices == [] and seen == 16


# ----- stream usage: chat ---------------------------------------------------------------------


def chat_usage(client, **kwargs):
    """(usage of the reply, usage of the same request streamed, the stream's chunks)."""
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, **kwargs)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, stream=True,
                                                 stream_options=USAGE, **kwargs))
    assert chunks[-1].choices == [] and all(chunk.usage is None for chunk in chunks[:-1])
    return reply.usage, chunks[-1].usage, chunks


def logprob_entries(chunks) -> int:
    return sum(len(c.logprobs.content) for chunk in chunks for c in chunk.choices if c.logprobs)


def test_chat_stream_usage_with_n_and_logprobs(client):
    reply, streamed, chunks = chat_usage(client, n=2, max_tokens=5, logprobs=True, extra_body={"ignore_eos": True})
    assert streamed.completion_tokens == logprob_entries(chunks) == 2 * 5
    assert streamed.model_dump() == reply.model_dump()


def test_chat_stream_usage_with_a_tool_call(client):
    reply, streamed, chunks = chat_usage(client, tools=TOOLS, tool_choice=PICK, max_tokens=40, logprobs=True)
    calls = [call for chunk in chunks for c in chunk.choices for call in c.delta.tool_calls or []]
    assert [call.function.name for call in calls] == ["pick"]
    assert [c.finish_reason for chunk in chunks for c in chunk.choices][-1] == "tool_calls"
    assert streamed.completion_tokens == logprob_entries(chunks) < 40  # the call's tokens, EOS included
    assert streamed.model_dump() == reply.model_dump()


def test_chat_stream_ended_by_a_stop_string_counts_the_tokens_up_to_it(client, offline):
    prompt_ids = offline.apply_chat_template(MESSAGES)
    full = greedy_text(offline, prompt_ids, 24)
    stop = full[8:10]
    reply, streamed, chunks = chat_usage(client, max_tokens=24, stop=stop, extra_body={"ignore_eos": True})
    assert "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices) == full[:full.index(stop)]
    assert streamed.completion_tokens == tokens_to_stop(offline, prompt_ids, stop) < 24
    assert (streamed.prompt_tokens, streamed.model_dump()) == (len(prompt_ids), reply.model_dump())


def test_continuous_usage_stats_in_every_chat_chunk(client, offline):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, n=2, temperature=1.0, logprobs=True, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True}))
    prompt_tokens = len(offline.apply_chat_template(MESSAGES))
    assert chunks[0].choices[0].delta.role == "assistant"
    seen = 0
    for chunk in chunks:
        seen += logprob_entries([chunk])
        assert (chunk.usage.prompt_tokens, chunk.usage.completion_tokens) == (prompt_tokens, seen)
    assert chunks[0].usage.completion_tokens == 0 and chunks[-1].choices == [] and seen == 8


# ----- logit_bias and seed on chat ------------------------------------------------------------


def test_chat_logit_bias_of_100_makes_greedy_pick_that_token(client, offline):
    (token_id,) = offline.tokenizer.encode(" c", add_special_tokens=False)
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0)
    biased = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                            logit_bias={str(token_id): 100})
    assert biased.choices[0].message.content == " c c c c c" != plain.choices[0].message.content
    assert biased.usage.completion_tokens == 5
    # Sampled too: +100 leaves every other token with no chance.
    sampled = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=1.0,
                                             logit_bias={str(token_id): 100})
    assert sampled.choices[0].message.content == " c c c c c"


def test_chat_seed_makes_sampling_reproducible(client):
    def sample(seed: int) -> str:
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=1.0,
                                               seed=seed, extra_body={"ignore_eos": True})
        return reply.choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first  # 12 tokens drawn from a near-uniform tiny model: a repeat is all but impossible


def test_stream_options_without_stream_is_a_400_on_both_endpoints(client):
    message = "stream_options is only allowed when stream is true"
    assert error_of(lambda: client.completions.create(model=MODEL, prompt="hi", max_tokens=2,
                                                      stream_options={"include_usage": True})) == (
        message, "stream_options")
    assert error_of(lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                           max_tokens=2, stream_options={"include_usage": True})) == (
        message, "stream_options")
