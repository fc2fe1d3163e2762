"""`splitfuse serve` / `splitfuse generate`: flags generated from the config dataclasses, and a real server
process that shuts down cleanly (exit 0) on SIGTERM / SIGINT."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from splitfuse.config import CacheConfig, SchedulerConfig, config_fields
from splitfuse.entrypoints.cli import build_parser
from splitfuse.entrypoints.openai import cli_args
from splitfuse.entrypoints.openai.server_config import API_KEY_ENV, ServerConfig
from server_process import free_port, wait_for_health

pytestmark = pytest.mark.timeout(300)

def parser() -> argparse.ArgumentParser:
    return build_parser()


def help_of(config_cls: type, name: str) -> str:
    return next(f for f in config_fields(config_cls) if f.name == name).metadata["help"]


def test_serve_help_comes_from_the_config_dataclasses(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for config_cls, name in [(CacheConfig, "block_size"), (SchedulerConfig, "max_waiting_requests"),
                             (SchedulerConfig, "max_num_batched_tokens"), (ServerConfig, "port")]:
        assert f"--{name.replace('_', '-')}" in text
        assert " ".join(help_of(config_cls, name).split()) in text
    assert "--no-enable-prefix-caching" in text and "--kv-cache-memory" in text


def test_serve_flags_become_configs(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    args = parser().parse_args([
        "serve", "/models/x", "--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "8",
        "--max-num-batched-tokens", "64", "--kv-cache-memory", "1GiB", "--no-enable-prefix-caching",
        "--max-waiting-requests", "3", "--host", "0.0.0.0", "--port", "9001", "--served-model-name", "a", "b",
        "--api-key", "k", "--log-level", "debug"])
    engine, server, names = cli_args.serve_configs(args)
    assert (engine.model.model, engine.model.dtype, engine.model.max_model_len) == ("/models/x", "float32", 128)
    assert (engine.cache.kv_cache_memory, engine.cache.enable_prefix_caching) == (1 << 30, False)
    assert (engine.scheduler.max_num_seqs, engine.scheduler.max_num_batched_tokens) == (8, 64)
    assert engine.scheduler.max_waiting_requests == 3
    assert (server.host, server.port, server.api_key, server.log_level) == ("0.0.0.0", 9001, "k", "debug")
    assert names == ["a", "b"]
    # Unset flags keep the dataclass defaults (one source of truth).
    engine, server, names = cli_args.serve_configs(parser().parse_args(["serve", "/models/x"]))
    assert engine.cache == CacheConfig() and engine.scheduler == SchedulerConfig()
    assert (server.port, server.api_key, names) == (8000, None, ["/models/x"])


def test_serve_takes_the_model_as_a_flag_too():
    engine, _, names = cli_args.serve_configs(parser().parse_args(["serve", "--model", "/models/y"]))
    assert (engine.model.model, names) == ("/models/y", ["/models/y"])
    with pytest.raises(ValueError, match="two models given: '/models/x' and --model '/models/y'"):
        cli_args.serve_configs(parser().parse_args(["serve", "/models/x", "--model", "/models/y"]))


def test_api_key_from_the_environment_and_the_default_model_by_default(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    engine, server, names = cli_args.serve_configs(parser().parse_args(["serve"]))
    assert (engine.model.model, server.api_key, names) == (
        "smollm2-135m-instruct", "from-env", ["smollm2-135m-instruct"])


def test_invalid_flag_values_exit_2_with_the_message(capsys):
    assert cli_args.run_serve(parser().parse_args(["serve", "/models/x", "--dtype", "int3"])) == 2
    assert "dtype must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--kv-cache-memory", "lots"])


def test_generate_answers_through_the_chat_template_and_completes_the_text_with_raw(llama_ckpt, capsys):
    from splitfuse.entrypoints.llm import LLM
    from splitfuse.sampling_params import SamplingParams

    llm = LLM(model=llama_ckpt, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=6)
    answer = llm.chat([{"role": "user", "content": "Once upon a time"}], params, use_tqdm=False)[0].outputs[0]
    completion = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0]
    assert answer.token_ids != completion.token_ids and answer.text != completion.text
    flags = ["--model", llama_ckpt, "--max-tokens", "6", "--temperature", "0", "--dtype", "float32"]
    for extra_flags, expected in [([], answer.text), (["--raw"], completion.text)]:
        args = parser().parse_args(["generate", "Once upon a time", *flags, *extra_flags])
        assert args.func(args) == 0
        assert capsys.readouterr().out == expected + "\n"


def stream_lines(url: str, max_tokens: int, lines: list[str]) -> None:
    """Collects the SSE lines of one completion; "<cut>" marks a connection closed mid-stream."""
    body = {"prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            lines.extend(line for line in response.iter_lines() if line)
    except httpx.TransportError:
        lines.append("<cut>")


# SIGTERM with a generous drain: the in-flight request finishes. SIGINT with no drain: it is aborted.
@pytest.mark.parametrize("signum, drain_s, max_tokens, finishes", [
    (signal.SIGTERM, 60, 40, True), (signal.SIGINT, 0, 480, False)], ids=["SIGTERM-drain", "SIGINT-abort"])
def test_signal_stops_accepting_drains_or_aborts_and_exits_0(llama_ckpt, signum, drain_s, max_tokens, finishes):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "splitfuse", "serve", llama_ckpt, "--port", str(port), "--dtype", "float32",
               "--shutdown-timeout-s", str(drain_s), "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, API_KEY_ENV: ""})
    lines: list[str] = []
    try:
        wait_for_health(process, url)
        client = threading.Thread(target=stream_lines, args=(url, max_tokens, lines))
        client.start()
        while len(lines) < 2:  # in flight: a token has arrived
            time.sleep(0.01)
        process.send_signal(signum)
        assert process.wait(timeout=120) == 0  # (a bare `import torch` process takes seconds to exit here)
        client.join(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if finishes:
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
    else:
        # Aborted at once, not run to the end; the stream still ends properly, with an error event.
        assert lines[-1] == "data: [DONE]" and len(lines) < max_tokens
        error = json.loads(lines[-2][len("data: "):])["error"]
        assert error["message"] == "the server is shutting down; request aborted"
        assert (error["type"], error["code"]) == ("service_unavailable_error", "engine_unavailable")
    with pytest.raises(httpx.TransportError):  # no longer accepting
        httpx.get(url + "/health", timeout=1)
