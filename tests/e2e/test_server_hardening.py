"""Nothing a client sends hurts the server (issue 11, items 1-5), over real HTTP on the tiny Llama.

Each reproduction from the issue is here with its exact status and message: request chat templates
(refused, or sandboxed and limited when trusted), over-long text refused before tokenizing, lone
surrogates, deep JSON nesting, per-request caps, and the waiting-queue limits (429 + Retry-After).
After all of it the server still serves, /health stayed fast, and no KV block or request is left.

Numbers the messages quote: the tiny tokenizer's longest token is 17 characters, so with
max_model_len 256 no prompt of more than 255 * 17 = 4,335 characters can fit.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import threading
import time

import httpx
import pytest

from splitfuse.config import EngineConfig
from splitfuse.engine.async_engine import AsyncLLMEngine
from splitfuse.entrypoints.openai.server import ServerThread, build_app
from splitfuse.entrypoints.openai.server_config import ServerConfig
from splitfuse.metrics.prometheus import parse_metrics

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny-llama"
MAX_MODEL_LEN = 256
CHARS_PER_TOKEN = 17
MAX_PROMPT_CHARS = (MAX_MODEL_LEN - 1) * CHARS_PER_TOKEN  # 4335
FITS = (f"no prompt of more than {MAX_PROMPT_CHARS} characters fits the model's context length (max_model_len) "
        f"of {MAX_MODEL_LEN} tokens (a token stands for {CHARS_PER_TOKEN} characters at most)")
TEMPLATE_TIMEOUT_S = 0.5
MESSAGES = [{"role": "user", "content": "Hello"}]
OK_BODY = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
UNTRUSTED = ("this server does not render chat templates sent in requests; start it with "
             "--trust-request-chat-template to allow them")
SURROGATE = ('the JSON body holds a lone UTF-16 surrogate (such as "\\ud800"); strings must be valid Unicode')
TOO_DEEP = "the JSON body nests arrays and objects more than 200 levels deep"
NESTED_LOOPS = ("{% set ns = namespace(c=0) %}{% for i in range(700) %}{% for j in range(1000) %}"
                "{% set ns.c = ns.c + j %}{% endfor %}{% endfor %}{{ ns.c }}")
# The templates and what each gives when the server trusts request templates.
REPRO_TEMPLATES = [
    ("{{ 1/0 }}", "cannot apply the chat template: ZeroDivisionError: division by zero", "chat_template_error"),
    ("{{ 10.0 ** 400 }}", "cannot apply the chat template: OverflowError: (34, 'Numerical result out of range')",
     "chat_template_error"),
    ("{{ range(1000000)|length }}", "cannot apply the chat template: OverflowError: Range too big. The sandbox "
     "blocks ranges larger than MAX_RANGE (100000).", "chat_template_error"),
    ("{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}",
     "cannot apply the chat template: the template recurses too deeply", "chat_template_error"),
    (NESTED_LOOPS, f"cannot apply the chat template: the chat template took longer than {TEMPLATE_TIMEOUT_S:g} s "
     "to render", "chat_template_timeout"),
    ("{{ ('x' * 200000000)|length }}", "the chat prompt is too long (the template builds a string or list of "
     f"200000000 items; the limit is {MAX_PROMPT_CHARS}), but {FITS}", "prompt_too_long"),
]


def start(checkpoint: str, config: ServerConfig = ServerConfig(), **engine_kwargs) -> ServerThread:
    engine_config = EngineConfig.from_kwargs(model=checkpoint, dtype="float32", max_model_len=MAX_MODEL_LEN,
                                             **engine_kwargs)
    return ServerThread(build_app(AsyncLLMEngine.from_config(engine_config), [MODEL], config)).__enter__()


def app_state(server: ServerThread):
    return server.server.config.app.state


@pytest.fixture(scope="module")
def server(llama_ckpt):
    running = start(llama_ckpt)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def trusted(llama_ckpt):
    running = start(llama_ckpt, ServerConfig(trust_request_chat_template=True,
                                             chat_template_timeout_s=TEMPLATE_TIMEOUT_S))
    yield running
    processes = app_state(running).prompt_workers.process_ids()
    running.stop()
    assert processes and not any(os.path.exists(f"/proc/{pid}") for pid in processes)  # killed and reaped


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def assert_error(response: httpx.Response, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.json() == {"error": {"message": message, "type": "invalid_request_error", "param": param,
                                         "code": code}}


def chat(messages=MESSAGES, **fields) -> dict:
    return {"model": MODEL, "messages": messages, "max_tokens": 2, **fields}


# ----- 1. chat templates ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", [t for t, _, _ in REPRO_TEMPLATES] + ["x"])
def test_request_chat_templates_are_refused_unless_trusted(api, template):
    for body in (chat(chat_template_kwargs={"chat_template": template}), chat(chat_template=template)):
        assert_error(api.post("/v1/chat/completions", json=body), 400, UNTRUSTED, "chat_template",
                     "chat_template_not_allowed")


@pytest.mark.parametrize("template, message, code", REPRO_TEMPLATES)
def test_trusted_templates_run_sandboxed_and_limited(trusted, template, message, code):
    body = chat(chat_template_kwargs={"chat_template": template})
    response = httpx.post(trusted.url + "/v1/chat/completions", json=body, timeout=60)
    param = "messages"
    assert_error(response, 400, message, param, code)


def test_health_stays_fast_while_a_template_runs_into_its_time_limit(trusted):
    async def main() -> tuple[httpx.Response, list[float]]:
        async with httpx.AsyncClient(base_url=trusted.url, timeout=60) as client:
            slow = asyncio.create_task(client.post("/v1/chat/completions", json=chat(chat_template=NESTED_LOOPS)))
            latencies = []
            while not slow.done():
                started = time.perf_counter()
                assert (await client.get("/health")).status_code == 200
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.01)
            return await slow, latencies

    response, latencies = asyncio.run(main())
    assert response.status_code == 400 and response.json()["error"]["code"] == "chat_template_timeout"
    assert len(latencies) >= 10 and max(latencies) < 0.1, latencies


def test_a_trusted_template_and_plain_kwargs_make_the_prompt(trusted):
    body = chat(chat_template="{{ greeting }}, {{ name }}{% if loud %}!{% endif %} {{ bos_token }}",
                chat_template_kwargs={"greeting": "Hello", "name": "Ann", "loud": True})
    response = httpx.post(trusted.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    expected = httpx.post(trusted.url + "/v1/completions", timeout=60,
                          json={**OK_BODY, "prompt": "Hello, Ann! <|im_start|>"}).json()["usage"]["prompt_tokens"]
    assert response.json()["usage"]["prompt_tokens"] == expected - 1  # chat adds no BOS: the template writes it


@pytest.mark.parametrize("value, shape", [([1], "list"), ({"a": 1}, "dict")])
def test_chat_template_kwargs_take_only_plain_values(api, value, shape):
    assert_error(api.post("/v1/chat/completions", json=chat(chat_template_kwargs={"x": value})), 400,
                 "chat_template_kwargs.x: invalid value; expected str or bool or int or float",
                 "chat_template_kwargs.x")


# ----- 2. long text: refused before it is tokenized; the event loop and the engine stay free --------------------


def test_text_longer_than_any_prompt_that_fits_is_refused_before_tokenizing(api):
    long_text = "x" * (MAX_PROMPT_CHARS + 1)
    assert_error(api.post("/v1/completions", json={**OK_BODY, "prompt": long_text}), 400,
                 f"prompt has {MAX_PROMPT_CHARS + 1} characters, but {FITS}", "prompt", "prompt_too_long")
    assert_error(api.post("/v1/completions", json={**OK_BODY, "prompt": ["Hello", long_text], "stream": True}),
                 400, f"prompt has {MAX_PROMPT_CHARS + 1} characters, but {FITS}", "prompt", "prompt_too_long")
    # At the bound the text is tokenized, and the engine counts its tokens.
    response = api.post("/v1/completions", json={**OK_BODY, "prompt": "x" * MAX_PROMPT_CHARS})
    assert response.status_code == 400 and "tokens, but the model's context length (max_model_len) is 256" in \
        response.json()["error"]["message"]
    # The template stops once its output passes the bound: "<|im_start|>user\n" + content is 17 + 4400.
    assert_error(api.post("/v1/chat/completions", json=chat([{"role": "user", "content": "y" * 4400}])), 400,
                 "the chat prompt is too long (the template builds a string or list of 4417 items; the limit is "
                 f"{MAX_PROMPT_CHARS}), but {FITS}", "messages", "prompt_too_long")


def test_token_id_prompts_longer_than_the_context_are_refused_before_the_engine(api):
    assert_error(api.post("/v1/completions", json={**OK_BODY, "prompt": [1] * 300}), 400,
                 "prompt has 300 tokens, but the model's context length (max_model_len) is 256", "prompt")


def post_raw(host: str, port: int, path: str, body: bytes) -> int:
    """POST ``body`` over a plain socket and return the status: sendall and recv wait without the GIL,
    so these clients, in the server's process, take no Python time from it while they send."""
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        response = b""
        while b"\r\n" not in response:
            chunk = sock.recv(65536)
            if not chunk:
                break
            response += chunk
    return int(response.split(b" ", 2)[1])


def test_health_answers_within_100ms_while_huge_requests_are_refused(server):
    huge_text = "hello world " * ((ServerConfig.max_request_body_bytes - 200) // 12)  # just under the body limit
    huge = [("/v1/completions", {**OK_BODY, "prompt": huge_text}, 400),
            ("/v1/chat/completions", chat([{"role": "user", "content": huge_text}]), 400),
            ("/v1/completions", {**OK_BODY, "prompt": huge_text * 2}, 413)]
    encoded = [(path, json.dumps(body).encode(), status) for path, body, status in huge]
    statuses: dict[int, list[int]] = {}

    def send(index: int) -> None:  # four times in a row, so the polls below overlap many refusals
        path, body, _ = encoded[index]
        statuses[index] = [post_raw(server.host, server.port, path, body) for _ in range(4)]

    senders = [threading.Thread(target=send, args=(i,)) for i in range(len(encoded))]
    latencies = []
    health = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        health.request("GET", "/health")  # connected before the clock starts
        health.getresponse().read()
        for sender in senders:
            sender.start()
        while any(sender.is_alive() for sender in senders):
            started = time.perf_counter()
            health.request("GET", "/health")
            response = health.getresponse()
            assert response.status == 200 and json.loads(response.read()) == {"status": "ok"}
            latencies.append(time.perf_counter() - started)
            time.sleep(0.005)
    finally:
        health.close()
    assert [statuses[i] for i in range(len(encoded))] == [[status] * 4 for _, _, status in encoded]
    assert len(latencies) >= 5 and max(latencies) < 0.1, latencies


# ----- 3. lone surrogates ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", '{"prompt": "\\ud800", "max_tokens": 2}'),
    ("/v1/completions", '{"prompt": ["ok", "a\\udc00"], "max_tokens": 2}'),
    ("/v1/completions", '{"model": "\\ud800", "prompt": "Hello"}'),
    ("/v1/completions", '{"prompt": "Hello", "stop": ["\\ud800x"]}'),
    ("/v1/completions", '{"prompt": "Hello", "user": "\\udbff"}'),
    ("/v1/completions", '{"prompt": "Hello", "unknown": {"deep": "\\ud800"}}'),
    ("/v1/completions", '{"prompt": "Hello", "logit_bias": {"\\ud800": 1}}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], '
                             '"chat_template_kwargs": {"x": "\\ud800"}}'),
])
def test_lone_surrogates_are_400_and_the_keep_alive_connection_stays_usable(server, path, body):
    connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        connection.request("POST", path, body, {"content-type": "application/json"})
        response = connection.getresponse()
        local_address = connection.sock.getsockname()
        payload = json.loads(response.read())
        assert response.status == 400
        assert payload == {"error": {"message": SURROGATE, "type": "invalid_request_error", "param": None,
                                     "code": "invalid_unicode"}}
        # The same connection serves the next request; a surrogate *pair* is an ordinary character.
        connection.request("POST", "/v1/completions", '{"prompt": "Hello \\ud83d\\ude00", "max_tokens": 2}',
                           {"content-type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200, response.read()
        response.read()
        assert connection.sock.getsockname() == local_address
    finally:
        connection.close()


# ----- 4. deep nesting ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [600, 900])
@pytest.mark.parametrize("path, head", [("/v1/completions", '{"prompt": "Hello", "x": '),
                                        ("/v1/chat/completions", '{"messages": [{"role": "user"}], "x": '),
                                        ("/v1/chat/completions", '{"messages": [{"role": "user"}], '
                                                                 '"chat_template_kwargs": {"x": ')])
def test_deep_json_nesting_is_400(api, path, head, depth):
    nested = "[" * depth + "]" * depth
    body = head + nested + "}" * head.count("{")
    assert_error(api.post(path, content=body, headers={"content-type": "application/json"}), 400, TOO_DEEP,
                 code="json_too_deep")
    # Depth up to the limit is fine (the unknown field is ignored).
    body = '{"prompt": "Hello", "max_tokens": 2, "x": ' + "[" * 200 + "]" * 200 + "}"
    assert api.post("/v1/completions", content=body, headers={"content-type": "application/json"}).status_code == 200


def test_other_malformed_json_keeps_its_message(api):
    assert_error(api.post("/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"}),
                 400, "malformed JSON body: EOF while parsing a value at line 1 column 15", code="invalid_json")
    assert_error(api.post("/v1/completions", content=b'{"prompt": "\xff"}',
                           headers={"content-type": "application/json"}),
                 400, "malformed JSON body: invalid unicode code point at line 1 column 13", code="invalid_json")
    assert_error(api.post("/v1/completions", json={**OK_BODY, "prompt": [[1], "a"]}), 400,
                 "prompt: invalid value; expected str or list[str] or list[int] or list[list[int]]", "prompt")


# ----- 5. caps and admission control ----------------------------------------------------------------------------


def test_prompts_and_choices_per_request_are_capped(api):
    assert_error(api.post("/v1/completions", json={**OK_BODY, "prompt": ["a"] * 2000}), 400,
                 "prompt holds 2000 prompts; at most 128 are allowed per request", "prompt")
    assert_error(api.post("/v1/completions", json={**OK_BODY, "prompt": ["a"] * 100, "n": 2}), 400,
                 "n x prompts = 2 x 100 = 200 choices; at most 128 are allowed per request", "n")
    assert_error(api.post("/v1/chat/completions", json=chat(n=129)), 400, "n must be between 1 and 128, got 129",
                 "n")
    assert api.post("/v1/completions", json={**OK_BODY, "prompt": ["a"] * 64, "n": 2}).status_code == 200


def test_full_waiting_queue_is_429_with_retry_after_and_frees_everything(llama_ckpt):
    server = start(llama_ckpt, max_num_seqs=1, max_waiting_requests=2, max_waiting_tokens=20)
    long_body = {**OK_BODY, "prompt": [1, 2, 3], "max_tokens": 200, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            # One runs (max_num_seqs=1), one waits with 15 prompt tokens.
            with client.stream("POST", "/v1/completions", json=long_body) as running, \
                    client.stream("POST", "/v1/completions", json={**long_body, "prompt": [5] * 15}) as waiting:
                assert running.status_code == waiting.status_code == 200
                refused = client.post("/v1/completions", json={**OK_BODY, "prompt": [7] * 10})
                assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                assert refused.json() == {"error": {
                    "message": "the waiting queue is full (15 tokens wait to be computed, 10 more would pass the "
                               "limit of 20)", "type": "rate_limit_error", "param": None, "code": "queue_full"}}
                refused = client.post("/v1/completions", json={**OK_BODY, "prompt": [7], "n": 2})
                assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["message"] == "the waiting queue is full (2 requests)"
            # The streams were dropped; once nothing waits, a prompt longer than the token limit may wait alone.
            deadline = time.monotonic() + 20
            while metrics(client)["splitfuse:num_requests_running"] and time.monotonic() < deadline:
                time.sleep(0.02)
            assert client.post("/v1/completions", json={**OK_BODY, "prompt": [7] * 30}).status_code == 200
            assert_idle(client)
    finally:
        server.stop()


def test_a_request_the_waiting_queue_could_never_take_is_400_not_429(llama_ckpt):
    server = start(llama_ckpt, max_waiting_requests=4, max_waiting_tokens=20)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            assert_error(client.post("/v1/completions", json={**OK_BODY, "prompt": [[1] * 15, [2] * 6]}), 400,
                         "the prompts hold 21 tokens, more than the waiting queue ever holds "
                         "(max_waiting_tokens = 20)", "prompt")
            assert_error(client.post("/v1/completions", json={**OK_BODY, "prompt": [[1], [2], [3]], "n": 2}), 400,
                         "n x prompts = 6 sequences, more than the waiting queue ever holds "
                         "(max_waiting_requests = 4)", "n")
            # The same amounts as one prompt, or within the limits, are served.
            assert client.post("/v1/completions", json={**OK_BODY, "prompt": [1] * 21}).status_code == 200
            assert client.post("/v1/completions", json={**OK_BODY, "prompt": [[1] * 14, [2] * 6]}).status_code == 200
            assert_idle(client)
    finally:
        server.stop()


def test_defaults_bound_the_queue_the_body_and_the_choices():
    from splitfuse.config import SchedulerConfig

    scheduler, config = SchedulerConfig(), ServerConfig()
    assert (scheduler.max_waiting_requests, scheduler.max_waiting_tokens) == (256, 131072)
    assert (config.max_request_body_bytes, config.max_prompts_per_request, config.max_choices_per_request) == \
        (1 << 20, 128, 128)
    assert (config.trust_request_chat_template, config.chat_template_timeout_s, config.prompt_workers) == \
        (False, 1.0, 2)


def test_the_limits_are_serve_flags():
    from splitfuse.entrypoints.cli import build_parser
    from splitfuse.entrypoints.openai import cli_args

    args = build_parser().parse_args([
        "serve", "/models/x", "--trust-request-chat-template", "--chat-template-timeout-s", "2.5",
        "--max-prompts-per-request", "8", "--max-choices-per-request", "16", "--prompt-workers", "3",
        "--max-request-body-bytes", "2048", "--max-waiting-requests", "10", "--max-waiting-tokens", "5000"])
    engine, server, _ = cli_args.serve_configs(args)
    assert (server.trust_request_chat_template, server.chat_template_timeout_s, server.max_prompts_per_request,
            server.max_choices_per_request, server.prompt_workers, server.max_request_body_bytes) == \
        (True, 2.5, 8, 16, 3, 2048)
    assert (engine.scheduler.max_waiting_requests, engine.scheduler.max_waiting_tokens) == (10, 5000)


# ----- after all of it ------------------------------------------------------------------------------------------


def metrics(client: httpx.Client) -> dict[str, float]:
    return parse_metrics(client.get("/metrics").text)


def assert_idle(client: httpx.Client) -> None:
    deadline = time.monotonic() + 20
    while True:
        values = metrics(client)
        idle = (values["splitfuse:num_requests_running"] == values["splitfuse:num_requests_waiting"] == 0
                and values["splitfuse:num_free_kv_blocks"] == values["splitfuse:num_total_kv_blocks"])
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert values["splitfuse:num_free_kv_blocks"] == values["splitfuse:num_total_kv_blocks"]
    assert values["splitfuse:num_requests_running"] == values["splitfuse:num_requests_waiting"] == 0


def test_after_every_refusal_the_server_serves_and_holds_nothing(server, api):
    engine = app_state(server).engine
    assert_idle(api)
    assert engine.num_unfinished == 0 and not engine.engine.has_unfinished_requests()
    assert api.post("/v1/completions", json=OK_BODY).status_code == 200
    assert api.post("/v1/chat/completions", json=chat()).status_code == 200
    assert api.get("/health").json() == {"status": "ok"}
