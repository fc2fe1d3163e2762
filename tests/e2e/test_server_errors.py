"""Server failure paths over real HTTP: every error status and message, client disconnects, /metrics.

After each error the same server must keep serving; after dropped clients every KV block
must be back in the pool.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from splitfuse.config import EngineConfig
from splitfuse.engine.async_engine import AsyncLLMEngine
from splitfuse.entrypoints.openai.server import ServerThread, build_app
from splitfuse.metrics.prometheus import parse_metrics

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny-llama"
API_KEY = "secret"
MAX_MODEL_LEN = 256
MAX_BODY_BYTES = 100_000
AUTH = {"Authorization": f"Bearer {API_KEY}"}
OK_BODY = {"model": MODEL, "prompt": "Hello", "max_tokens": 3}


def start_server(checkpoint: str, **engine_kwargs) -> tuple[ServerThread, AsyncLLMEngine]:
    config = EngineConfig.from_kwargs(model=checkpoint, dtype="float32", max_model_len=MAX_MODEL_LEN,
                                      **engine_kwargs)
    engine = AsyncLLMEngine.from_config(config)
    app = build_app(engine, [MODEL], api_key=API_KEY, max_request_body_bytes=MAX_BODY_BYTES)
    return ServerThread(app).__enter__(), engine


@pytest.fixture(scope="module")
def served(llama_ckpt):
    server, engine = start_server(llama_ckpt)
    yield server, engine
    server.stop()


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served[0].url, headers=AUTH, timeout=60) as client:
        yield client


def metrics(http: httpx.Client) -> dict[str, float]:
    return parse_metrics(http.get("/metrics").text)


def assert_error(response: httpx.Response, status: int, message_part: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message_part in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def wait_until_idle(http: httpx.Client, timeout_s: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        values = metrics(http)
        idle = (values["splitfuse:num_requests_running"] == values["splitfuse:num_requests_waiting"] == 0
                and values["splitfuse:num_free_kv_blocks"] == values["splitfuse:num_total_kv_blocks"])
        if idle or time.monotonic() > deadline:
            return values
        time.sleep(0.05)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -1, "temperature must be in [0, 100], got -1"),
    ("top_p", 2, "top_p must be in (0, 1], got 2"),
    ("n", 0, "n must be between 1 and 128, got 0"),
    ("max_tokens", 0, "max_tokens must be an integer >= 1, got 0"),
    ("logprobs", 50, "logprobs must be an integer in [0, 20], got 50"),
    ("presence_penalty", 3, "presence_penalty must be in [-2, 2]"),
    ("min_tokens", 9, "min_tokens (9) must be <= max_tokens (3)"),
    ("stop_token_ids", [100_000], "token id 100000 is outside the vocabulary (size 512)"),
    ("seed", 1 << 64, "seed must be a signed 64-bit integer, got 18446744073709551616"),
])
def test_invalid_parameters_are_400_naming_the_field(http, field, value, message):
    assert_error(http.post("/v1/completions", json={**OK_BODY, field: value}), 400, message, field)


def test_malformed_or_mistyped_bodies_are_400(http):
    assert_error(http.post("/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"}),
                 400, "malformed JSON body")
    assert_error(http.post("/v1/completions", json={"model": MODEL}), 400, "prompt: Field required", "prompt")
    assert_error(http.post("/v1/completions", json={**OK_BODY, "temperature": "hot"}), 400, "temperature",
                 "temperature")
    assert_error(http.post("/v1/completions", json={**OK_BODY, "logit_bias": {"abc": 1}}), 400,
                 "logit_bias keys must be token ids", "logit_bias")
    assert_error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": []}), 400, "messages",
                 "messages")
    assert_error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "wizard"}]}),
                 400, "messages.0.role")


def test_bad_prompts_are_400(http):
    assert_error(http.post("/v1/completions", json={**OK_BODY, "prompt": ""}), 400, "prompt is empty")
    assert_error(http.post("/v1/completions", json={**OK_BODY, "prompt": []}), 400, "prompt must not be empty")
    assert_error(http.post("/v1/completions", json={**OK_BODY, "prompt": [1, 2, 9999]}), 400,
                 "prompt token id 9999 is outside the vocabulary (size 512)")


def test_unknown_model_is_400(http):
    error = assert_error(http.post("/v1/completions", json={**OK_BODY, "model": "gpt-9"}), 400,
                         "the model 'gpt-9' does not exist", "model")
    assert error["code"] == "model_not_found"


def test_prompt_plus_max_tokens_beyond_the_context_window_is_400_with_both_numbers(http):
    error = assert_error(http.post("/v1/completions", json={**OK_BODY, "max_tokens": 300}), 400,
                         "max_tokens (300)")
    assert f"max_model_len) of {MAX_MODEL_LEN}" in error["message"]
    long_chat = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 400}]}
    error = assert_error(http.post("/v1/chat/completions", json=long_chat), 400, "(max_model_len) is 256")
    assert "prompt has" in error["message"]
    # A streaming request is refused the same way, before any event is sent.
    assert_error(http.post("/v1/completions", json={**OK_BODY, "max_tokens": 300, "stream": True}), 400,
                 "max_tokens (300)")


def test_missing_or_wrong_api_key_is_401_on_v1_only(served, http):
    url = served[0].url
    assert_error(httpx.post(url + "/v1/completions", json=OK_BODY), 401, "missing API key")
    with openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as raised:
            client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert raised.value.status_code == 401 and "invalid API key" in raised.value.message
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200


def test_oversized_body_is_413(http):
    body = {**OK_BODY, "prompt": "x" * (MAX_BODY_BYTES + 1)}
    error = assert_error(http.post("/v1/completions", json=body), 413, f"larger than {MAX_BODY_BYTES} bytes")
    assert error["code"] == "request_too_large"


def test_unknown_route_and_method_use_the_error_shape(http):
    assert_error(http.get("/v1/nothing"), 404, "Not Found")
    assert_error(http.get("/v1/completions"), 405, "Method Not Allowed")


def test_echo_with_too_many_logprobs_is_a_400_and_a_valid_one_scores_the_prompt(http):
    error = assert_error(http.post("/v1/completions", json={**OK_BODY, "echo": True, "logprobs": 21}), 400,
                         "logprobs must be an integer in [0, 20], got 21")
    assert error["param"] == "logprobs"
    reply = http.post("/v1/completions", json={**OK_BODY, "echo": True, "logprobs": 1})
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["logprobs"]["token_logprobs"][0] is None  # the first prompt token


def test_full_waiting_queue_is_429_and_the_server_recovers(llama_ckpt):
    server, _ = start_server(llama_ckpt, max_waiting_requests=1)
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
            error = assert_error(client.post("/v1/completions", json={**OK_BODY, "n": 2}), 429,
                                 "the waiting queue is full (1 requests)")
            assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
            assert client.post("/v1/completions", json=OK_BODY).status_code == 200
            assert metrics(client)["splitfuse:request_rejected_total{reason=queue_full}"] == 1
    finally:
        server.stop()


def test_metrics_parse_and_move(http):
    before = metrics(http)
    response = http.post("/v1/completions", json={**OK_BODY, "max_tokens": 5, "ignore_eos": True}).json()
    after = metrics(http)

    def moved(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert moved("splitfuse:generation_tokens_total") == 5
    assert moved("splitfuse:prompt_tokens_total") == response["usage"]["prompt_tokens"]
    assert moved("splitfuse:request_success_total{finished_reason=length}") == 1
    assert moved("splitfuse:time_to_first_token_seconds_count") == 1
    assert moved("splitfuse:inter_token_latency_seconds_count") == 4
    assert moved("splitfuse:e2e_request_latency_seconds_count") == 1
    assert after["splitfuse:prefix_cache_queries_total"] >= after["splitfuse:prefix_cache_hits_total"]
    assert 0 <= after["splitfuse:prefix_cache_hit_rate"] <= 1
    assert after["splitfuse:kv_cache_usage_perc"] == 0 and after["splitfuse:num_preemptions_total"] >= 0


def test_dropped_streams_and_requests_are_aborted_and_free_their_blocks(served, http):
    server, engine = served
    before = wait_until_idle(http)
    long_body = {**OK_BODY, "max_tokens": 200, "ignore_eos": True, "stream": True}

    async def drop_mid_stream(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", "/v1/completions", json=long_body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    return  # leave after the first token: the connection closes mid-stream

    async def give_up_on_a_running_request(client: httpx.AsyncClient) -> None:
        # A non-streaming request answers only when it is done; its client leaves once it is running.
        # First the dropped streams' aborts must have landed, or "running" could still count one of them.
        while parse_metrics((await client.get("/metrics")).text)["splitfuse:num_requests_running"] > 0:
            await asyncio.sleep(0.001)
        request = asyncio.create_task(client.post("/v1/completions", json={**long_body, "stream": False}))
        while parse_metrics((await client.get("/metrics")).text)["splitfuse:num_requests_running"] < 1:
            assert not request.done(), "the request finished before the client could give up on it"
            await asyncio.sleep(0.001)
        request.cancel()  # closes the connection
        with pytest.raises(asyncio.CancelledError):
            await request

    async def main() -> None:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60, limits=limits) as client:
            await asyncio.gather(*(drop_mid_stream(client) for _ in range(50)))
            await give_up_on_a_running_request(client)

    asyncio.run(main())

    after = wait_until_idle(http)
    assert after["splitfuse:num_free_kv_blocks"] == after["splitfuse:num_total_kv_blocks"]
    assert after["splitfuse:num_requests_running"] == after["splitfuse:num_requests_waiting"] == 0
    aborted = after.get("splitfuse:request_success_total{finished_reason=abort}", 0) - before.get(
        "splitfuse:request_success_total{finished_reason=abort}", 0)
    assert aborted == 51
    generated = after["splitfuse:generation_tokens_total"] - before["splitfuse:generation_tokens_total"]
    assert generated < 51 * 200 / 2  # they stopped early, not ran to max_tokens
    assert engine.num_unfinished == 0 and not engine.engine.has_unfinished_requests()
    # ... and the server still serves.
    assert http.post("/v1/completions", json=OK_BODY).status_code == 200
