"""`splitfuse serve --distributed-backend ray --ray-address ADDR` on a Ray cluster that is not its own.

The cluster is started apart, as a user starts one on the machines it spans (`ray start --head`,
here one node with 2 CPUs, no dashboard, token authentication on with a token of the test's own);
the server is a separate process that joins it as a driver and places its two engine cores there as
actors of 1 CPU each. The cluster's own accounting, read by a third process, shows both CPUs taken
while the server runs and free again once it stops; the answers are the in-thread engine's.
Skipped where Ray is not installed.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from splitfuse.entrypoints.llm import LLM
from splitfuse.sampling_params import SamplingParams
from server_process import free_port, serve_process

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(300)

PROMPTS = [[5, 9, 14, 200, 31], [7, 7, 8, 100, 4, 16, 23]]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    """A head node from `ray start --head --block` in a process of its own: (its address, the env to join it)."""
    port = free_port()
    ray_cli = Path(sys.executable).with_name("ray")
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    process = subprocess.Popen([str(ray_cli), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                                f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                                "--disable-usage-stats", f"--temp-dir={tmp_path_factory.mktemp('ray')}"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **env})
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([str(ray_cli), "status", f"--address={address}"], capture_output=True,
                             env={**os.environ, **env}).returncode:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(1)
        yield address, env
    finally:
        process.terminate()  # --block: the head takes its node's processes down with it
        process.wait(timeout=60)


def free_cpus(address: str, env: dict[str, str]) -> float:
    """The cluster's free CPUs as it accounts them, asked by a driver of its own (which takes none)."""
    script = (f"import json, ray; ray.init(address={address!r}, log_to_driver=False); "
              "print(json.dumps(ray.available_resources().get('CPU', 0.0)))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_serve_places_its_replicas_on_an_existing_cluster_and_answers_with_the_in_thread_text(llama_ckpt,
                                                                                               ray_head):
    address, env = ray_head
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = [o.outputs[0].text for o in LLM(model=llama_ckpt, dtype="float32").generate(
        PROMPTS, greedy, use_tqdm=False)]
    assert free_cpus(address, env) == 2.0
    with serve_process(llama_ckpt, "--dtype", "float32", "--served-model-name", "tiny", "--distributed-backend",
                       "ray", "--ray-address", address, "--replicas", "2", "--threads-per-replica", "1",
                       "--routing", "round-robin", timeout_s=240, env=env) as url:
        texts = []
        for prompt in PROMPTS * 2:  # round-robin: each prompt once on each replica
            response = httpx.post(url + "/v1/completions", timeout=120, json={
                "model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] == 6
            texts.append(response.json()["choices"][0]["text"])
        assert texts == expected * 2
        assert free_cpus(address, env) == 0.0  # both engine cores hold their CPU on the cluster
        assert httpx.get(url + "/health", timeout=30).json() == {"status": "ok", "replicas": {"replica-0": "up",
                                                                                             "replica-1": "up"}}
    deadline = time.monotonic() + 60  # the server gone, its actors go with it
    while free_cpus(address, env) != 2.0:
        assert time.monotonic() < deadline, "the engine core actors outlived their server"
        time.sleep(1)


def test_a_wrong_cluster_token_is_a_clear_startup_error(llama_ckpt, ray_head):
    address, env = ray_head
    command = [sys.executable, "-m", "splitfuse", "serve", llama_ckpt, "--dtype", "float32",
               "--distributed-backend", "ray", "--ray-address", address, "--port", str(free_port())]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240,
                          env={**os.environ, **env, "RAY_AUTH_TOKEN": "0" * 64})
    assert done.returncode != 0
    assert "Failed to connect to Ray cluster" in done.stderr, done.stderr[-2000:]
