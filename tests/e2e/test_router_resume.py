"""A backend killed mid-stream behind `splitfuse router`: the client's stream goes on on the other backend.

Two real `splitfuse serve` processes on the real default model (SmolLM2-135M-Instruct, fp32), over
real sockets. The client reads a greedy stream through the router and SIGKILLs the backend serving
it after a few tokens; the text it ends up with must equal the same request's stream with no
failure, token for token, and the stream must read as one (one id, one role opening, usage over
the whole answer). Each test restarts the killed backend.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator

import httpx
import pytest

from splitfuse.entrypoints.openai.server import ServerThread
from splitfuse.metrics.prometheus import parse_metrics
from splitfuse.router.backends import BackendConfig, BackendPool
from splitfuse.router.policies import make_policy
from splitfuse.router.server import build_router_app
from server_process import ServeProcess, serve_pair

pytestmark = pytest.mark.timeout(300)

MODEL = "smollm2"
COMPLETION = {"model": MODEL, "prompt": "The three primary colors are", "max_tokens": 40, "temperature": 0,
              "stream": True, "stream_options": {"include_usage": True}}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}],
        "max_tokens": 40, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
KILL_AFTER = 6  # text events the client has read when it kills the backend
# Health rounds slower than a test: the killed backend is found dead by its broken stream, not a health check.
SLOW_HEALTH = BackendConfig(health_interval_s=30.0)


@pytest.fixture(scope="module")
def backends(smollm2_fp32_dir) -> Iterator[list[ServeProcess]]:
    with serve_pair(smollm2_fp32_dir, MODEL) as processes:
        yield processes


@pytest.fixture
def killed_then_restarted(backends) -> Iterator[ServeProcess]:
    """Backend a, which round-robin picks first; restarted after the test if the test killed it."""
    a = backends[0]
    yield a
    if a.process.poll() is not None:
        a.start()
        a.wait_healthy()


@contextlib.contextmanager
def router(urls: list[str]) -> Iterator[str]:
    with ServerThread(build_router_app(BackendPool(urls, SLOW_HEALTH), make_policy("round-robin"))) as server:
        yield server.url


def text_of(kind: str, event: Any) -> str:
    if not isinstance(event, dict) or not event.get("choices"):
        return ""
    choice = event["choices"][0]
    return (choice.get("delta", {}).get("content") if kind == "chat" else choice.get("text")) or ""


def read_stream(url: str, path: str, body: dict, kill: ServeProcess | None = None) -> list[Any]:
    """The stream's events ([DONE] kept); with ``kill``, that backend is SIGKILLed after KILL_AFTER text events."""
    kind = "chat" if "messages" in body else "completions"
    events: list[Any] = []
    pending = b""
    with httpx.stream("POST", url + path, json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for chunk in response.iter_raw():
            *complete, pending = (pending + chunk).split(b"\n\n")
            for block in complete:
                assert block.startswith(b"data: "), block
                payload = block[len(b"data: "):].decode()
                events.append(payload if payload == "[DONE]" else json.loads(payload))
                if kill is not None and sum(1 for e in events if text_of(kind, e)) == KILL_AFTER:
                    kill.kill()
                    kill = None
    assert pending == b""
    assert kill is None, "the stream ended before the backend was killed"
    return events


def summary(kind: str, events: list[Any]) -> dict:
    """What a client makes of a stream: its text, finish reason, usage, ids, and where [DONE] is."""
    finishes = [c["finish_reason"] for e in events if isinstance(e, dict) for c in e["choices"] if c["finish_reason"]]
    usages = [e["usage"] for e in events if isinstance(e, dict) and e.get("usage")]
    roles = [c["delta"]["role"] for e in events if isinstance(e, dict) for c in e["choices"]
             if kind == "chat" and "role" in c["delta"]]
    return {"text": "".join(text_of(kind, e) for e in events), "finish_reasons": finishes, "usage": usages,
            "ids": sorted({e["id"] for e in events if isinstance(e, dict)}).__len__(), "roles": roles,
            "done_last": events[-1] == "[DONE]" and events.count("[DONE]") == 1}


def resumed_count(url: str) -> float:
    return parse_metrics(httpx.get(url + "/metrics").text)["splitfuse_router:streams_resumed_total"]


@pytest.mark.parametrize("path, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)],
                         ids=["completion", "chat"])
def test_a_stream_goes_on_on_the_other_backend_with_the_same_greedy_text(backends, killed_then_restarted, path,
                                                                          body):
    a, b = backends
    kind = "chat" if "messages" in body else "completions"
    expected = summary(kind, read_stream(b.url, path, body))
    assert len(expected["text"]) > 40 and expected["usage"][0]["completion_tokens"] == 40
    with router([a.url, b.url]) as url:
        got = summary(kind, read_stream(url, path, body, kill=killed_then_restarted))
        assert resumed_count(url) == 1
    assert got == expected
    assert got["ids"] == 1 and got["finish_reasons"] == ["length"] and got["done_last"]
    if kind == "chat":
        assert got["roles"] == ["assistant"]


def test_with_no_other_backend_the_stream_ends_with_an_error_event(backends, killed_then_restarted):
    a = killed_then_restarted
    with router([a.url]) as url:
        events = read_stream(url, "/v1/completions", COMPLETION, kill=a)
        assert resumed_count(url) == 0
    assert len([e for e in events if text_of("completions", e)]) >= KILL_AFTER
    error = events[-1]["error"]
    assert error["code"] == "backend_error" and error["type"] == "server_error"
    assert error["message"].startswith(f"the backend {a.url} broke off the stream: ")
    assert "it cannot go on elsewhere: no healthy backend to route to: " in error["message"]
