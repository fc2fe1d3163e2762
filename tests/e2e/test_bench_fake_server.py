"""`bench serve` end to end against a tiny fake OpenAI-compatible streaming server on 127.0.0.1.

The fake streams exactly max_tokens chunks (one token each) with a small delay,
counts token-id prompts, and returns usage; variants answer HTTP 500 or stall.
"""

import asyncio
import json
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("aiohttp")
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402

from splitfuse.bench.cli import main  # noqa: E402


def make_app(mode: str, token_delay_s: float) -> FastAPI:
    app = FastAPI()
    app.state.bodies = []
    app.state.in_flight = 0
    app.state.max_in_flight = 0

    @app.get("/version")
    async def version():
        return {"version": "fake-0.1"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        app.state.bodies.append(body)
        if mode == "error":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        prompt = body["prompt"]
        prompt_tokens = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        return StreamingResponse(stream(body, prompt_tokens, chat=False), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await request.json()
        app.state.bodies.append(body)
        prompt_tokens = len(body["messages"][-1]["content"].split())  # a stand-in count
        return StreamingResponse(stream(body, prompt_tokens, chat=True), media_type="text/event-stream")

    async def stream(body, prompt_tokens, chat):
        app.state.in_flight += 1
        app.state.max_in_flight = max(app.state.max_in_flight, app.state.in_flight)
        try:
            max_tokens = body["max_tokens"]
            for index in range(max_tokens):
                if mode == "stall" and index == 1:
                    await asyncio.sleep(3600)  # first token sent, then nothing
                await asyncio.sleep(token_delay_s)
                finish = "length" if index == max_tokens - 1 else None
                choice = {"index": 0, "finish_reason": finish}
                if chat:
                    choice["delta"] = {"content": f" t{index}"}
                else:
                    choice["text"] = f" t{index}"
                chunk = {"model": body["model"], "choices": [choice]}
                yield f"data: {json.dumps(chunk)}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                         "total_tokens": prompt_tokens + max_tokens}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            app.state.in_flight -= 1

    return app


@contextmanager
def fake_server(mode: str = "ok", token_delay_s: float = 0.005):
    app = make_app(mode, token_delay_s)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # a free loopback port, held until the server owns it
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app.state
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


def run_bench(url: str, out_dir: Path, *extra: str) -> tuple[int, dict, Path]:
    argv = ["serve", "--base-url", url, "--model", "fake", "--output-dir", str(out_dir),
            "--no-progress", "--seed", "1", *extra]
    code = main(argv)
    [json_path] = sorted(out_dir.glob("*.json"))
    return code, json.loads(json_path.read_text()), json_path


def test_closed_loop_run_saves_json_and_png_with_exact_token_counts(tmp_path):
    with fake_server() as (url, state):
        code, report, json_path = run_bench(
            url, tmp_path, "--arrival", "closed", "--concurrency", "2", "--num-requests", "6",
            "--prompt-len", "16", "--output-len", "5")
    assert code == 0
    assert json_path.with_suffix(".png").stat().st_size > 0
    assert report["server"]["version"] == "fake-0.1"
    assert report["command"][:4] == ["python", "-m", "splitfuse.bench", "serve"]
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["python"]
    [point] = report["points"]
    assert point["sweep_parameter"] == "concurrency" and point["sweep_value"] == 2
    metrics = point["metrics"]
    assert (metrics["num_requests"], metrics["num_succeeded"], metrics["num_errors"]) == (6, 6, 0)
    assert metrics["total_output_tokens"] == 30
    for request in point["requests"]:
        assert request["output_tokens"] == 5 and request["output_tokens_source"] == "usage"
        assert len(request["token_times_s"]) == 5
        assert request["prompt_tokens"] == request["server_prompt_tokens"] == 16
    # what the server received: exact lengths as token ids, forced output length, streamed
    assert len(state.bodies) == 6
    for body in state.bodies:
        assert len(body["prompt"]) == 16 and all(100 <= i < 1000 for i in body["prompt"])
        assert (body["max_tokens"], body["min_tokens"], body["ignore_eos"]) == (5, 5, True)
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["temperature"] == 0
    assert 1 <= state.max_in_flight <= 2  # closed loop: never more than the client count


def test_poisson_run_saves_json_and_png(tmp_path):
    with fake_server() as (url, state):
        code, report, json_path = run_bench(
            url, tmp_path, "--arrival", "poisson", "--rate", "40", "--num-requests", "8",
            "--prompt-len", "uniform:8:12", "--output-len", "4",
            "--slo-ttft-ms", "5000", "--slo-tpot-ms", "1000")
    assert code == 0
    assert json_path.with_suffix(".png").exists()
    [point] = report["points"]
    assert point["name"] == "poisson-r40"
    metrics = point["metrics"]
    assert metrics["num_succeeded"] == 8
    assert metrics["slo"]["attainment"] == 1.0
    assert metrics["fluidity"]["index"] == pytest.approx(1.0)
    for request in point["requests"]:
        assert request["output_tokens"] == len(request["token_times_s"]) == 4
        assert request["server_prompt_tokens"] == request["prompt_tokens"]
        assert 8 <= request["prompt_tokens"] <= 12
    sent = sorted(len(body["prompt"]) for body in state.bodies)
    assert sent == sorted(request["prompt_tokens"] for request in point["requests"])


def test_sweep_gives_one_point_per_concurrency_and_plot_overlays_files(tmp_path):
    with fake_server() as (url, _):
        code, report, json_path = run_bench(
            url, tmp_path, "--concurrency", "1", "--sweep", "1,3", "--num-requests", "3",
            "--prompt-len", "8", "--output-len", "3", "--no-plot", "--label", "fake")
    assert code == 0
    assert [p["sweep_value"] for p in report["points"]] == [1, 3]
    assert all(p["metrics"]["num_succeeded"] == 3 for p in report["points"])
    overlay = tmp_path / "overlay.png"
    assert main(["plot", str(json_path), str(json_path), "-o", str(overlay), "--labels", "a,b"]) == 0
    assert overlay.stat().st_size > 0


def test_multi_turn_turns_are_sent_after_the_previous_turn_ends(tmp_path):
    with fake_server() as (url, state):
        code, report, _ = run_bench(
            url, tmp_path, "--workload", "multi-turn", "--num-turns", "2", "--concurrency", "2",
            "--num-requests", "4", "--prompt-len", "6", "--output-len", "3", "--no-plot")
    assert code == 0
    requests = report["points"][0]["requests"]
    by_turn = {(r["conversation_id"], r["turn"]): r for r in requests}
    for conversation in (0, 1):
        first, second = by_turn[(conversation, 0)], by_turn[(conversation, 1)]
        assert second["send_time_s"] >= first["end_time_s"]
        assert second["prompt_tokens"] == 6 + 3 + 6


def test_server_errors_are_counted_and_the_run_ends(tmp_path):
    with fake_server(mode="error") as (url, _):
        start = time.monotonic()
        code, report, json_path = run_bench(
            url, tmp_path, "--concurrency", "2", "--num-requests", "5", "--prompt-len", "8",
            "--output-len", "3", "--no-plot")
        elapsed = time.monotonic() - start
    assert code == 1  # nothing succeeded
    assert elapsed < 8
    metrics = report["points"][0]["metrics"]
    assert (metrics["num_requests"], metrics["num_errors"]) == (5, 5)
    assert metrics["error_counts"] == {"HTTP 500": 5}
    assert len(report["points"][0]["requests"]) == 5


def test_stalling_server_times_out_and_the_run_ends_in_time(tmp_path):
    with fake_server(mode="stall") as (url, _):
        start = time.monotonic()
        code, report, _ = run_bench(
            url, tmp_path, "--arrival", "poisson", "--rate", "50", "--num-requests", "3",
            "--prompt-len", "8", "--output-len", "4", "--request-timeout-s", "1", "--duration-s", "2",
            "--no-plot")
        elapsed = time.monotonic() - start
    assert elapsed < 5  # at most duration (2 s) + request timeout (1 s), plus start-up
    assert code == 1
    metrics = report["points"][0]["metrics"]
    assert (metrics["num_requests"], metrics["num_errors"], metrics["num_timeouts"]) == (3, 3, 3)
    for request in report["points"][0]["requests"]:
        assert request["timed_out"] and len(request["token_times_s"]) == 1
        assert 0.95 <= request["end_time_s"] - request["send_time_s"] < 2.0  # cut off at 1 s


def test_chat_endpoint_with_text_prompts_of_exact_token_length(tmp_path, tiny_tokenizer):
    tokenizer = tiny_tokenizer
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    with fake_server() as (url, state):
        code, report, _ = run_bench(
            url, tmp_path / "out", "--endpoint", "chat", "--prompt-format", "text",
            "--tokenizer", str(tmp_path / "tokenizer"), "--vocab-low", "10", "--vocab-high", "500",
            "--num-requests", "3", "--prompt-len", "24", "--output-len", "4", "--no-plot")
    assert code == 0
    assert all(r["output_tokens"] == len(r["token_times_s"]) == 4 for r in report["points"][0]["requests"])
    for body in state.bodies:
        text = body["messages"][0]["content"]
        assert len(tokenizer.encode(text, add_special_tokens=False)) == 24


def test_text_prompts_need_ids_inside_the_tokenizer_vocabulary(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    code = main(["serve", "--base-url", "http://127.0.0.1:9", "--model", "m", "--prompt-format", "text",
                 "--tokenizer", str(tmp_path / "tokenizer"), "--num-requests", "1"])
    assert code == 2  # --vocab-high 1000 is beyond 512 tokens: refused before any request


class FakeLLM:
    """Stands in for splitfuse.entrypoints.llm.LLM: answers max_tokens ids, with engine timestamps."""

    created = []

    def __init__(self, model="", **engine_kwargs):
        FakeLLM.created.append((model, engine_kwargs))

    def generate(self, prompts, params, use_tqdm=True):
        from types import SimpleNamespace

        outputs = []
        for index, (prompt, sampling) in enumerate(zip(prompts, params)):
            assert sampling.ignore_eos and sampling.max_tokens == sampling.min_tokens
            metrics = SimpleNamespace(arrival_time=100.0, first_token_time=100.5 + index,
                                      finished_time=101.5 + index)
            completion = SimpleNamespace(token_ids=[7] * sampling.max_tokens)
            outputs.append(SimpleNamespace(outputs=[completion], metrics=metrics, prompt_token_ids=prompt))
        return outputs


def test_offline_mode_reports_throughput_of_llm_generate(tmp_path, monkeypatch):
    import types

    fake_module = types.ModuleType("splitfuse.entrypoints.llm")
    fake_module.LLM = FakeLLM
    monkeypatch.setitem(sys.modules, "splitfuse.entrypoints.llm", fake_module)
    FakeLLM.created.clear()
    code = main(["offline", "--model", "/models/x", "--max-num-seqs", "8", "--num-requests", "3",
                 "--prompt-len", "10", "--output-len", "5", "--output-dir", str(tmp_path)])
    assert code == 0
    assert FakeLLM.created == [("/models/x", {"max_num_seqs": 8})]
    [json_path] = tmp_path.glob("*.json")
    report = json.loads(json_path.read_text())
    metrics = report["points"][0]["metrics"]
    assert (metrics["num_requests"], metrics["total_output_tokens"], metrics["num_length_mismatches"]) == (3, 15, 0)
    assert metrics["total_prompt_tokens"] == 30
    assert metrics["ttft_s"]["p50"] == pytest.approx(1.5)  # 0.5, 1.5, 2.5
    assert metrics["tpot_s"]["mean"] == pytest.approx(1.0 / 4)


def test_offline_mode_on_a_tiny_checkpoint(tmp_path, llama_ckpt):
    pytest.importorskip("splitfuse.entrypoints.llm")
    code = main(["offline", "--model", llama_ckpt, "--dtype", "float32", "--num-requests", "3",
                 "--prompt-len", "8", "--output-len", "4", "--vocab-high", "500",
                 "--output-dir", str(tmp_path)])
    assert code == 0
    [json_path] = tmp_path.glob("*.json")
    metrics = json.loads(json_path.read_text())["points"][0]["metrics"]
    assert metrics["total_output_tokens"] == 12 and metrics["num_length_mismatches"] == 0
    assert metrics["output_tokens_per_s"] > 0
