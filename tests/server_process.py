"""Test helpers for `splitfuse serve` run as a real process on a free loopback port.

Importable from any test module: pytest puts this folder (the one holding the root conftest.py) on sys.path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator, Optional

import httpx

from splitfuse.entrypoints.openai.server_config import API_KEY_ENV
from splitfuse.metrics.prometheus import parse_metrics


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(process: subprocess.Popen, url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.2)


@contextlib.contextmanager
def serve_process(*serve_args: str, timeout_s: float = 120, env: Optional[dict[str, str]] = None
                  ) -> Iterator[str]:
    """`python -m splitfuse serve ARGS --port P` with no API key; yields its base URL once healthy."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "splitfuse", "serve", *serve_args, "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, API_KEY_ENV: "", **(env or {})})
    try:
        wait_for_health(process, url, timeout_s)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=120)


class ServeProcess:
    """`splitfuse serve CHECKPOINT` (fp32) as a real process on one port across restarts, for tests that kill it."""

    def __init__(self, checkpoint: str, model_name: str, *extra_args: str) -> None:
        self.command = [sys.executable, "-m", "splitfuse", "serve", checkpoint, "--dtype", "float32",
                        "--served-model-name", model_name, "--log-level", "warning", *extra_args]
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        port = self.url.rsplit(":", 1)[1]
        self.process = subprocess.Popen(self.command + ["--port", port], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env={**os.environ, API_KEY_ENV: ""})

    def wait_healthy(self) -> None:
        wait_for_health(self.process, self.url)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)

    def num_finished(self, finished_reason: str = "") -> float:
        values = parse_metrics(httpx.get(self.url + "/metrics", timeout=10).text)
        name = "splitfuse:request_success_total" + (f"{{finished_reason={finished_reason}}}" if finished_reason else "")
        return sum(v for k, v in values.items() if k.startswith(name))


@contextlib.contextmanager
def serve_pair(checkpoint: str, model_name: str) -> Iterator[list[ServeProcess]]:
    """Two `ServeProcess`es of one checkpoint, started together (both load at once), stopped at the end."""
    processes = [ServeProcess(checkpoint, model_name), ServeProcess(checkpoint, model_name)]
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.wait_healthy()
        yield processes
    finally:
        for process in processes:
            if process.process is not None:
                process.stop()
