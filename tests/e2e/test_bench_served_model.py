"""`splitfuse bench serve` without --model asks the server: the first id of GET /v1/models, as vLLM's bench does."""

from __future__ import annotations

import json

import pytest

from splitfuse.bench.cli import main
from server_process import free_port, serve_process

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server_url(llama_ckpt):
    """A real `splitfuse serve` process on the tiny checkpoint, serving it as "tiny-served"."""
    with serve_process(llama_ckpt, "--dtype", "float32", "--served-model-name", "tiny-served",
                       "--log-level", "warning") as url:
        yield url


def test_without_model_the_served_name_is_used(server_url, tmp_path):
    code = main(["serve", "--base-url", server_url + "/v1", "--output-dir", str(tmp_path), "--no-progress",
                 "--no-plot", "--num-requests", "3", "--prompt-len", "8", "--output-len", "4", "--vocab-high", "500"])
    assert code == 0
    [json_path] = tmp_path.glob("*.json")
    report = json.loads(json_path.read_text())
    assert report["server"]["model"] == "tiny-served"
    metrics = report["points"][0]["metrics"]
    assert (metrics["num_succeeded"], metrics["num_errors"], metrics["total_output_tokens"]) == (3, 0, 3 * 4)


def test_without_model_and_without_a_server_the_error_says_pass_model(capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["serve", "--base-url", url, "--no-progress", "--num-requests", "1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"splitfuse bench serve: cannot learn the served model from {url}/v1/models (")
    assert error.endswith("); pass --model\n") and error.count("\n") == 1
