"""The OpenAI-compatible server over real HTTP (uvicorn on 127.0.0.1) with the official openai client.

Engine: the tiny fp32 Llama checkpoint; reference: the offline ``LLM`` on the same checkpoint,
so greedy text must match exactly.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from splitfuse.config import EngineConfig
from splitfuse.engine.async_engine import AsyncLLMEngine
from splitfuse.entrypoints.llm import LLM
from splitfuse.entrypoints.openai.server import ServerThread, build_app
from splitfuse.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny-llama"
API_KEY = "test-key"
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def server(llama_ckpt):
    engine = AsyncLLMEngine.from_config(EngineConfig.from_kwargs(model=llama_ckpt, dtype="float32"))
    with ServerThread(build_app(engine, [MODEL, "alias"], api_key=API_KEY)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as api:
        yield api


@pytest.fixture(scope="module")
def offline(llama_ckpt):
    return LLM(model=llama_ckpt, dtype="float32")


def greedy(offline: LLM, prompt, max_tokens: int = 12, **kwargs) -> str:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)
    return offline.generate(prompt, params, use_tqdm=False)[0].outputs[0].text


def test_models_health_and_version(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL, "alias"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/version").json()["version"]


def test_greedy_completion_equals_offline_generate_and_counts_usage(client, offline):
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    (choice,) = response.choices
    assert choice.text == greedy(offline, PROMPT)
    assert choice.finish_reason == "length" and response.model == MODEL
    num_prompt_tokens = len(offline.tokenizer.encode(PROMPT))
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (num_prompt_tokens, 12)
    assert response.usage.total_tokens == num_prompt_tokens + 12


def test_streamed_completion_concatenates_to_the_same_text_and_ends_with_usage(client, offline):
    chunks = list(client.completions.create(model="alias", prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy(offline, PROMPT)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_prompt_lists_and_token_ids_give_one_choice_per_prompt(client, offline):
    token_ids = offline.tokenizer.encode("Hello there")
    response = client.completions.create(model=MODEL, prompt=[PROMPT, "Hello there"], max_tokens=6, temperature=0)
    assert [c.index for c in response.choices] == [0, 1]
    assert [c.text for c in response.choices] == [greedy(offline, PROMPT, 6), greedy(offline, "Hello there", 6)]
    by_ids = client.completions.create(model=MODEL, prompt=token_ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == greedy(offline, "Hello there", 6)
    assert by_ids.usage.prompt_tokens == len(token_ids)
    two_id_prompts = client.completions.create(model=MODEL, prompt=[token_ids, token_ids[:3]], max_tokens=2)
    assert two_id_prompts.usage.prompt_tokens == len(token_ids) + 3


def test_n_choices_with_a_seed_are_reproducible(client):
    def sample():
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=3, temperature=1.0,
                                         seed=1234, extra_body={"ignore_eos": True})

    first, second = sample(), sample()
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1  # the n sequences are not copies of each other
    assert first.usage.completion_tokens == 24


def test_stop_string_cuts_the_text_streaming_or_not(client, offline):
    full = greedy(offline, PROMPT, 24)
    stop = full[8:10]
    expected = full[:full.index(stop)]
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert (response.choices[0].text, response.choices[0].finish_reason) == (expected, "stop")
    chunks = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected


def test_completion_logprobs_follow_the_legacy_shape(client):
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert "".join(logprobs.tokens) == response.choices[0].text  # this tiny tokenizer decodes token by token
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(5)]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 3
        assert top[token] == logprob == pytest.approx(max(top.values()))  # greedy picks the top token


def test_streamed_logprobs_continue_across_chunks(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1)
    chunks = [c for c in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                                   logprobs=1, stream=True) if c.choices]
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
    assert tokens == full.choices[0].logprobs.tokens
    assert offsets == full.choices[0].logprobs.text_offset


def test_echo_prepends_the_prompt(client, offline):
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert response.choices[0].text == PROMPT + greedy(offline, PROMPT, 4)


def test_chat_uses_the_checkpoint_template_and_equals_offline_chat(client, offline):
    expected = offline.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.outputs[0].text
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)

    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=10,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.outputs[0].text
    assert chunks[-1].usage.total_tokens == response.usage.total_tokens


def test_continue_final_message_goes_on_from_the_assistants_text(client, offline):
    """vLLM's flag: the last assistant message rendered open, as transformers renders it, and the reply goes on."""
    messages = [*MESSAGES, {"role": "assistant", "content": "Hello there"}]
    prompt = offline.tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert prompt.endswith("Hello there")
    prompt_ids = offline.tokenizer.encode(prompt, add_special_tokens=False)
    expected = greedy(offline, prompt_ids, 8)
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                              extra_body={"continue_final_message": True,
                                                          "add_generation_prompt": False})
    assert response.choices[0].message.content == expected
    assert response.usage.prompt_tokens == len(prompt_ids)

    def bad(messages, **extra) -> str:
        with pytest.raises(openai.BadRequestError) as failure:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                           extra_body={"continue_final_message": True, **extra})
        return failure.value.body["message"]

    assert bad(messages) == "continue_final_message and add_generation_prompt cannot both be true"
    assert bad(MESSAGES, add_generation_prompt=False) == \
        "continue_final_message needs the last message to be the assistant's, got 'user'"
    assert bad([*MESSAGES, {"role": "assistant", "content": ""}], add_generation_prompt=False) == (
        "continue_final_message: the chat template does not show the last message's text, so the reply cannot go "
        "on from it")


def test_chat_logprobs_and_n(client):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
                                              logprobs=True, top_logprobs=2, n=2)
    assert [c.index for c in response.choices] == [0, 1]
    for choice in response.choices:
        content = choice.logprobs.content
        assert "".join(entry.token for entry in content) == choice.message.content
        for entry in content:
            assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                     reverse=True)
            assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
            assert entry.bytes == list(entry.token.encode())


def test_chat_without_max_tokens_gets_the_rest_of_the_context_window(client):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, stop=["e"],
                                              logit_bias={"2": -100})  # no EOS: stops on "e" or length
    assert response.choices[0].finish_reason in ("stop", "length")


def test_64_concurrent_streams_all_complete_with_the_offline_text(server, offline):
    prompts = [f"Request number {i} says" for i in range(64)]
    expected = [o.outputs[0].text for o in offline.generate(prompts, SamplingParams(temperature=0, max_tokens=8),
                                                            use_tqdm=False)]

    async def stream_one(api: openai.AsyncOpenAI, prompt: str) -> str:
        chunks = await api.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in chunks if c.choices])

    async def main() -> list[str]:
        limits = httpx.Limits(max_connections=64)
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120,
                                      http_client=openai.DefaultAsyncHttpxClient(limits=limits)) as api:
            return await asyncio.gather(*(stream_one(api, p) for p in prompts))

    assert asyncio.run(main()) == expected
