"""`splitfuse router` in front of a foreign OpenAI server (vLLM's CPU build) beside a splitfuse server.

Both serve the default model (SmolLM2-135M, bf16): vLLM's CPU attention does not take the tiny test
models' shapes.

vLLM is not a dependency: the test runs only where ``SPLITFUSE_TEST_VLLM_START`` names a command
that starts vLLM's OpenAI server as ``COMMAND MODEL_DIR PORT [vllm serve args...]`` (the project's
peer setup has one, see docs/benchmarks.md); elsewhere it is skipped. vLLM takes a minute or more
to start on these machines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import pytest

from splitfuse.entrypoints.openai.server import ServerThread
from splitfuse.router.backends import BackendConfig, BackendPool
from splitfuse.router.policies import make_policy
from splitfuse.router.server import build_router_app
from server_process import free_port, serve_process

START_VLLM = os.environ.get("SPLITFUSE_TEST_VLLM_START")
pytestmark = [pytest.mark.skipif(not START_VLLM, reason="SPLITFUSE_TEST_VLLM_START is not set"),
              pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def vllm_url(smollm2_bf16_dir):
    port = free_port()
    process = subprocess.Popen([START_VLLM, smollm2_bf16_dir, str(port), "--served-model-name", "tiny",
                                "--max-model-len", "512"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(400):
            assert process.poll() is None, "vLLM exited while starting"
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def test_the_router_serves_through_vllm_and_splitfuse_alike(smollm2_bf16_dir, vllm_url):
    body = {"model": "tiny", "prompt": [5, 6, 7, 8, 9], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with serve_process(smollm2_bf16_dir, "--served-model-name", "tiny", timeout_s=300) as splitfuse_url:
        pool = BackendPool([splitfuse_url, vllm_url], BackendConfig(health_interval_s=0.2))
        with ServerThread(build_router_app(pool, make_policy("round-robin"))) as router:
            health = httpx.get(router.url + "/health").json()
            assert [b["up"] for b in health["backends"]] == [True, True]
            answers = [httpx.post(router.url + "/v1/completions", json=body, timeout=120) for _ in range(2)]
            assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
            assert all(a.json()["usage"]["completion_tokens"] == 6 for a in answers)
            # Streamed through the router from whichever backend is next: SSE ends with [DONE].
            with httpx.stream("POST", router.url + "/v1/completions", json={**body, "stream": True},
                              timeout=120) as response:
                lines = [line for line in response.iter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            # vLLM's own 400 comes back as vLLM wrote it.
            bad = {**body, "max_tokens": -1}
            direct = httpx.post(vllm_url + "/v1/completions", json=bad, timeout=60)
            routed = [httpx.post(router.url + "/v1/completions", json=bad, timeout=60) for _ in range(2)]
            assert direct.status_code == 400 and direct.content in [r.content for r in routed]
