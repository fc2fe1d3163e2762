"""`splitfuse bench serve` against a real splitfuse server on loopback: JSON + PNG, exact token counts."""

import json

import pytest

from splitfuse.bench.cli import main
from splitfuse.config import EngineConfig
from splitfuse.engine.async_engine import AsyncLLMEngine
from splitfuse.entrypoints.openai.server import ServerThread, build_app


@pytest.fixture(scope="module")
def server(llama_ckpt):
    engine = AsyncLLMEngine.from_config(EngineConfig.from_kwargs(model=llama_ckpt, dtype="float32"))
    with ServerThread(build_app(engine, ["tiny"])) as running:
        yield running, engine


@pytest.mark.parametrize("arrival", [["--arrival", "closed", "--concurrency", "3"],
                                     ["--arrival", "poisson", "--rate", "20"]], ids=["closed", "poisson"])
def test_bench_run_against_splitfuse_server(server, tmp_path, arrival):
    running, engine = server
    code = main(["serve", "--base-url", running.url, "--model", "tiny", "--output-dir", str(tmp_path),
                 "--no-progress", "--seed", "3", "--num-requests", "6", "--prompt-len", "uniform:5:40",
                 "--output-len", "7", "--vocab-high", "500", *arrival])
    assert code == 0
    [json_path] = sorted(tmp_path.glob("*.json"))
    assert json_path.with_suffix(".png").stat().st_size > 0
    report = json.loads(json_path.read_text())
    assert report["server"]["version"]
    [point] = report["points"]
    metrics = point["metrics"]
    assert (metrics["num_requests"], metrics["num_succeeded"], metrics["num_errors"]) == (6, 6, 0)
    assert metrics["total_output_tokens"] == 6 * 7
    for request in point["requests"]:
        assert request["output_tokens"] == 7 and request["output_tokens_source"] == "usage"
        assert request["prompt_tokens"] == request["server_prompt_tokens"]
        assert 5 <= request["prompt_tokens"] <= 40
        # One timestamp per chunk with text; a token that ends mid-character streams no text yet.
        assert 1 <= len(request["token_times_s"]) <= 7
    assert metrics["ttft_s"]["p50"] > 0 and metrics["tbt_s"]["p50"] > 0
    stats = engine.stats
    assert stats.num_free_blocks == stats.num_total_blocks  # every request's blocks came back
