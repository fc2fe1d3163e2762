"""`splitfuse router` in front of two real `splitfuse serve` processes (tiny fp32 Llama), over real sockets.

Which backend served a request is read from the backends' own /metrics (finished requests), so
the routing is checked where it lands, not where the router says it sent it. The failover test
kills a backend process (SIGKILL) and restarts it on the same port; it runs last, and leaves
the backend up again.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import subprocess
import sys
import time
from typing import Any, Iterator

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from splitfuse.entrypoints.openai.server import ServerThread
from splitfuse.metrics.prometheus import parse_metrics
from splitfuse.router.backends import Backend, BackendConfig, BackendPool, parse_load
from splitfuse.router.policies import make_policy, rendezvous_weight
from splitfuse.router.server import build_router_app, render_history, route_request_of
from splitfuse.router.types import RouteRequest
from server_process import ServeProcess, free_port, serve_pair, wait_for_health

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny"
PROMPT = "The quick brown fox"
GREEDY = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
# Health rounds fast enough that a test sees a backend go down and come back within a second or two.
FAST_HEALTH = BackendConfig(health_interval_s=0.2, fail_after=2, recover_after=2, breaker_cooldown_s=1.0)


@pytest.fixture(scope="module")
def backends(llama_ckpt) -> Iterator[list[ServeProcess]]:
    with serve_pair(llama_ckpt, MODEL) as processes:
        yield processes


@contextlib.contextmanager
def router(urls: list[str], routing: str = "round-robin", config: BackendConfig = FAST_HEALTH) -> Iterator[str]:
    with ServerThread(build_router_app(BackendPool(urls, config), make_policy(routing))) as server:
        yield server.url


def router_metrics(url: str) -> dict[str, float]:
    return parse_metrics(httpx.get(url + "/metrics").text)


def serve_each(backends: list[ServeProcess], requests: list[Any]) -> list[str]:
    """Sends each request (a callable) in turn, asserts a 200, and names the one backend that finished it."""
    served = []
    for send in requests:
        before = [backend.num_finished() for backend in backends]
        response = send()
        assert response.status_code == 200, response.text
        after = [backend.num_finished() for backend in backends]
        names = [backend.url for backend, x, y in zip(backends, before, after) if y > x]
        assert len(names) == 1, names
        served += names
    return served


def sse_events(raw: bytes) -> list[Any]:
    """The events of an SSE body, ``[DONE]`` kept, the per-request ``id`` and ``created`` dropped."""
    events = []
    for event in raw.decode().split("\n\n"):
        if not event:
            continue
        assert event.startswith("data: "), event
        payload = event[len("data: "):]
        events.append(payload if payload == "[DONE]" else
                      {k: v for k, v in json.loads(payload).items() if k not in ("id", "created")})
    return events


def stream(url: str, body: dict) -> tuple[int, bytes]:
    """(number of reads the body came in, the body) of a streamed completion."""
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = list(response.iter_raw())
    return len(chunks), b"".join(chunks)


# ----- routing keys, health and breaker as plain data ---------------------------------------------


def test_completions_route_on_the_prompt_and_chat_on_the_whole_history():
    assert route_request_of("completions", {"prompt": "Hi", "user": "u1"}, {}) == RouteRequest(text="Hi",
                                                                                              session_key="u1")
    assert route_request_of("completions", {"prompt": [5, 6, 7]}, {}) == RouteRequest(token_ids=[5, 6, 7])
    assert route_request_of("completions", {"prompt": ["a", "b"]}, {}) == RouteRequest(text="a")
    assert route_request_of("completions", {"prompt": [[1, 2], [3]]}, {}) == RouteRequest(token_ids=[1, 2])
    # The header names the session over the body's user.
    assert route_request_of("completions", {"prompt": "Hi", "user": "u1"},
                            {"x-session-id": "s9"}) == RouteRequest(text="Hi", session_key="s9")
    history = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello."},
               {"role": "user", "content": [{"type": "text", "text": "More"}, {"type": "image_url"}]}]
    assert render_history(history) == "system: Be terse.\nuser: Hi\nassistant: Hello.\nuser: More\n"
    assert render_history(history[:2]) == "system: Be terse.\nuser: Hi\n"  # a prefix of the next turn's text
    assert route_request_of("chat", {"messages": history}, {}) == RouteRequest(text=render_history(history))
    assert route_request_of("chat", ["not", "an", "object"], {}) == RouteRequest()


def test_health_thresholds_and_the_circuit_breaker():
    backend = Backend("http://b:1/", BackendConfig(fail_after=2, recover_after=2, breaker_failures=2,
                                                   breaker_cooldown_s=5.0))
    assert backend.url == "http://b:1"
    # The first check decides alone; then 2 failures in a row mark it down and 2 successes bring it back.
    assert [backend.on_health(ok) or backend.up for ok in (True, False, True)] == [True] * 3
    assert [backend.on_health(ok) for ok in (False, False)] == [False, True] and not backend.up
    assert [(backend.on_health(True), backend.up) for _ in range(2)] == [(False, False), (False, True)]
    # Two unreachable requests open the breaker for 5 s; then one trial goes through (half-open).
    backend.on_connect_failure(now_s=10.0)
    assert backend.breaker_state(10.0) == "closed" and backend.routable(10.0)
    backend.on_connect_failure(now_s=11.0)
    assert (backend.breaker_state(15.9), backend.routable(15.9)) == ("open", False)
    assert (backend.breaker_state(16.0), backend.routable(16.0)) == ("half_open", True)
    backend.acquire(16.0)
    assert not backend.routable(16.5)  # only the one trial
    backend.release()
    backend.on_connect_failure(16.5)  # the trial failed: open for another cool-down
    assert backend.breaker_state(21.4) == "open" and backend.breaker_state(21.5) == "half_open"
    backend.acquire(21.5)
    backend.on_answered()
    backend.release()
    assert (backend.breaker_state(21.6), backend.in_flight) == ("closed", 0)


def test_load_is_read_from_splitfuse_vllm_and_llama_server_gauges():
    assert parse_load("splitfuse:num_requests_waiting 2.0\nsplitfuse:num_requests_running 3.0\n"
                      "splitfuse:kv_cache_usage_perc 0.25\n") == {"num_waiting": 2, "num_running": 3,
                                                                  "kv_cache_usage": 0.25}
    assert parse_load('vllm:num_requests_running{engine="0"} 3\nvllm:num_requests_running{engine="1"} 2\n'
                      'vllm:gpu_cache_usage_perc{engine="0"} 0.5\nvllm:gpu_cache_usage_perc{engine="1"} 0.75\n'
                      ) == {"num_running": 5, "kv_cache_usage": 0.75}
    assert parse_load("llamacpp:requests_deferred 1\nllamacpp:kv_cache_usage_ratio 0.1\n") == {
        "num_waiting": 1, "kv_cache_usage": 0.1}
    assert parse_load("other_metric 1\n") == {}


# ----- through the router ------------------------------------------------------------------------------


def streamed_tokens(events: list[Any]) -> tuple[list[str], str]:
    """(the tokens, the finish reason) of a streamed completion with ``logprobs: 0``, whatever events they came in."""
    choices = [event["choices"][0] for event in events if event != "[DONE]"]
    return [token for choice in choices for token in choice["logprobs"]["tokens"]], choices[-1]["finish_reason"]


def test_a_stream_through_the_router_is_the_backends_stream_chunk_by_chunk(backends):
    a, b = backends
    body = {**GREEDY, "logprobs": 0}
    with router([a.url, b.url]) as url:
        num_reads, routed = stream(url, body)  # round-robin's first turn: a
    _, direct = stream(a.url, body)
    events = sse_events(routed)
    tokens, finish_reason = streamed_tokens(events)
    assert (tokens, finish_reason) == streamed_tokens(sse_events(direct))
    assert (len(tokens), finish_reason) == (12, "length")
    full = httpx.post(a.url + "/v1/completions", json=GREEDY, timeout=60).json()
    assert "".join(tokens) == full["choices"][0]["text"]
    # The backend merges tokens that pile up into one event, so how many there are varies; there are several
    # (text, the finish, [DONE]), and they came in more than one read: relayed as they came, not collected first.
    assert len(events) >= 3 and events[-1] == "[DONE]"
    assert num_reads > 1


def test_a_client_leaving_mid_stream_aborts_the_request_on_its_backend(backends):
    a, b = backends
    body = {**GREEDY, "max_tokens": 400, "ignore_eos": True, "stream": True}
    aborted_before = a.num_finished("abort")
    with router([a.url, b.url]) as url:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            next(response.iter_raw())  # the stream has begun; leaving now drops the connection
        deadline = time.monotonic() + 10
        while a.num_finished("abort") == aborted_before:
            assert time.monotonic() < deadline, "the backend kept generating for a client that left"
            time.sleep(0.05)
        assert [s["in_flight"] for s in httpx.get(url + "/health").json()["backends"]] == [0, 0]


def vllm_like_app(num_waiting: int) -> FastAPI:
    """A stand-in for a vLLM server's /health and /metrics (two engines), for what the router scrapes."""
    app = FastAPI()
    metrics = (f'vllm:num_requests_waiting{{engine="0"}} {num_waiting}\nvllm:num_requests_waiting{{engine="1"}} 1\n'
               'vllm:num_requests_running{engine="0"} 4\nvllm:kv_cache_usage_perc{engine="0"} 0.5\n')
    app.get("/health")(lambda: PlainTextResponse(""))
    app.get("/metrics")(lambda: PlainTextResponse(metrics))
    return app


def test_least_load_weighs_the_queues_scraped_from_each_backends_metrics(backends):
    a, _ = backends
    with ServerThread(vllm_like_app(num_waiting=5)) as busy, router([busy.url, a.url], routing="least-load") as url:
        health = httpx.get(url + "/health").json()["backends"]
        send = lambda: httpx.post(url + "/v1/completions", json={**GREEDY, "max_tokens": 1}, timeout=60)
        served = serve_each([a], [send] * 2)
    assert health == [
        {"url": busy.url, "up": True, "in_flight": 0, "breaker": "closed", "num_waiting": 6, "num_running": 4,
         "kv_cache_usage": 0.5},
        {"url": a.url, "up": True, "in_flight": 0, "breaker": "closed", "num_waiting": 0, "num_running": 0,
         "kv_cache_usage": 0.0}]
    assert served == [a.url] * 2


def test_round_robin_alternates_between_the_backends(backends):
    a, b = backends
    with router([a.url, b.url]) as url:
        send = lambda: httpx.post(url + "/v1/completions", json={**GREEDY, "max_tokens": 2}, timeout=60)
        assert serve_each(backends, [send] * 4) == [a.url, b.url, a.url, b.url]
        values = router_metrics(url)
    assert values[f"splitfuse_router:requests_total{{backend={a.url},status=200}}"] == 2
    assert values[f"splitfuse_router:requests_total{{backend={b.url},status=200}}"] == 2
    assert values["splitfuse_router:decisions_total{policy=round-robin,reason=round_robin}"] == 4
    assert values["splitfuse_router:retries_total"] == 0
    assert values[f"splitfuse_router:backend_up{{backend={a.url}}}"] == 1


def test_a_backends_400_and_the_models_list_pass_through_unchanged(backends):
    a, b = backends
    bad = {"model": MODEL, "prompt": PROMPT, "max_tokens": -1}
    with router([a.url, b.url]) as url:
        routed = httpx.post(url + "/v1/completions", json=bad, timeout=60)
        models = httpx.get(url + "/v1/models", timeout=60)
    direct = httpx.post(a.url + "/v1/completions", json=bad, timeout=60)
    assert (routed.status_code, routed.content) == (400, direct.content)
    assert routed.json()["error"]["param"] == "max_tokens"
    assert routed.headers["content-type"] == direct.headers["content-type"]
    assert models.json() == httpx.get(a.url + "/v1/models").json()


def test_a_body_that_is_not_json_is_the_routers_own_400(backends):
    a, b = backends
    with router([a.url, b.url]) as url:
        response = httpx.post(url + "/v1/chat/completions", content=b'{"messages": [', timeout=60)
        values = router_metrics(url)
    assert response.status_code == 400
    assert response.json() == {"error": {"message": "malformed JSON body: EOF while parsing a list at line 1 "
                                                    "column 14", "type": "invalid_request_error", "param": None,
                                         "code": "invalid_json"}}
    assert not any(k.startswith("splitfuse_router:requests_total") for k in values)  # no backend saw it


def test_the_router_starts_with_a_backend_down_and_routes_around_it(backends):
    a, _ = backends
    dead = f"http://127.0.0.1:{free_port()}"
    with router([dead, a.url]) as url:
        health = httpx.get(url + "/health")
        send = lambda: httpx.post(url + "/v1/completions", json={**GREEDY, "max_tokens": 2}, timeout=60)
        served = serve_each([a], [send] * 3)
        values = router_metrics(url)
    assert health.status_code == 200
    assert [(s["url"], s["up"], s["in_flight"], s["breaker"]) for s in health.json()["backends"]] == [
        (dead, False, 0, "closed"), (a.url, True, 0, "closed")]
    assert served == [a.url] * 3
    assert values[f"splitfuse_router:backend_up{{backend={dead}}}"] == 0
    assert values[f"splitfuse_router:requests_total{{backend={a.url},status=200}}"] == 3
    assert not any(k.startswith("splitfuse_router:requests_total") and dead in k for k in values)


def test_with_every_backend_down_the_router_still_starts_and_answers_503():
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    with router(dead) as url:
        health = httpx.get(url + "/health")
        response = httpx.post(url + "/v1/completions", json=GREEDY)
    assert (health.status_code, health.json()["status"]) == (503, "unavailable")
    assert response.status_code == 503
    assert response.json() == {"error": {
        "message": f"no healthy backend to route to: {dead[0]} is down (fails its health checks); "
                   f"{dead[1]} is down (fails its health checks)",
        "type": "service_unavailable_error", "param": None, "code": "no_healthy_backend"}}


def test_session_routing_keeps_each_user_on_one_backend(backends):
    a, b = backends
    home = lambda user: max((a.url, b.url), key=lambda replica: rendezvous_weight(user, replica))
    names = [f"user-{i}" for i in range(64)]  # the ports are random: take two users of each backend
    users = [u for u in names if home(u) == a.url][:2] + [u for u in names if home(u) == b.url][:2]
    assert len(users) == 4
    with router([a.url, b.url], routing="session") as url:
        def send(user: str) -> Any:
            return lambda: httpx.post(url + "/v1/completions", json={**GREEDY, "max_tokens": 1, "user": user},
                                      timeout=60)
        served = serve_each(backends, [send(user) for user in users for _ in range(2)])
    assert served == [home(user) for user in users for _ in range(2)] == [a.url] * 4 + [b.url] * 4


def test_cache_aware_routes_a_follow_up_turn_where_its_history_went(backends):
    a, b = backends
    first = [{"role": "system", "content": "You answer questions about the history of the printing press."},
             {"role": "user", "content": "Who built the first one?"}]
    follow_up = first + [{"role": "assistant", "content": "Gutenberg."}, {"role": "user", "content": "When?"}]
    with router([a.url, b.url], routing="cache-aware") as url:
        def send(messages: list) -> Any:
            return lambda: httpx.post(url + "/v1/chat/completions", timeout=60,
                                      json={"model": MODEL, "messages": messages, "max_tokens": 2})
        served = serve_each(backends, [send(first), send(follow_up)])
        values = router_metrics(url)
    assert served == [a.url, a.url]  # a miss goes to the least loaded (the first of equals), the follow-up after it
    assert values["splitfuse_router:decisions_total{policy=cache-aware,reason=cache_miss}"] == 1
    assert values["splitfuse_router:decisions_total{policy=cache-aware,reason=cache_hit}"] == 1


def test_the_router_command_proxies_a_streamed_chat_and_exits_cleanly(backends):
    a, b = backends
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "splitfuse", "router", "--backend", a.url, "--backend", b.url,
                                "--routing", "round-robin", "--port", str(port), "--health-interval-s", "0.2",
                                "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_health(process, url, timeout_s=60)
        messages = [{"role": "user", "content": "Say hello."}]
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as api:
            chunks = list(api.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                      stream=True))
        direct = httpx.post(a.url + "/v1/chat/completions", timeout=60,
                            json={"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0}).json()
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            direct["choices"][0]["message"]["content"]
        assert len(chunks) > 2
        assert [s["up"] for s in httpx.get(url + "/health").json()["backends"]] == [True, True]
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output


def test_a_killed_backend_fails_over_then_rejoins_when_restarted(backends):
    """Runs last: kills backend b and restarts it on its port."""
    a, b = backends
    send = lambda: httpx.post(url + "/v1/completions", json={**GREEDY, "max_tokens": 2}, timeout=60)
    with router([a.url, b.url]) as url:
        assert serve_each(backends, [send]) == [a.url]  # round-robin's next turn is b's
        b.kill()
        assert send().status_code == 200  # sent to b, refused before any byte, sent again to a
        assert router_metrics(url)["splitfuse_router:retries_total"] == 1
        assert serve_each([a], [send] * 2) == [a.url] * 2
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # a burst: b's turns go to a as well
            assert [r.status_code for r in pool.map(lambda _: send(), range(4))] == [200] * 4
        deadline = time.monotonic() + 5
        while httpx.get(url + "/health").json()["backends"][1]["up"]:
            assert time.monotonic() < deadline, "the router did not mark the killed backend down"
            time.sleep(0.05)
        values = router_metrics(url)
        assert values[f"splitfuse_router:requests_total{{backend={a.url},status=200}}"] == 8  # every request, each once
        assert values[f"splitfuse_router:requests_total{{backend={b.url},status=connect_error}}"] == \
            values["splitfuse_router:retries_total"]
        assert values[f"splitfuse_router:backend_up{{backend={b.url}}}"] == 0

        b.start()
        b.wait_healthy()
        deadline = time.monotonic() + 5  # recover_after 2 rounds of 0.2 s, with room for a loaded machine
        while not httpx.get(url + "/health").json()["backends"][1]["up"]:
            assert time.monotonic() < deadline, "the restarted backend did not rejoin"
            time.sleep(0.05)
        assert sorted(serve_each(backends, [send] * 2)) == sorted([a.url, b.url])
