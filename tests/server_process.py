"""Test helpers for `splitfuse serve` run as a real process on a free loopback port.

Importable from any test module: pytest puts this folder (the one holding the root conftest.py) on sys.path.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from typing import Iterator

import httpx

from splitfuse.entrypoints.openai.server_config import API_KEY_ENV


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
def serve_process(*serve_args: str, timeout_s: float = 120) -> Iterator[str]:
    """`python -m splitfuse serve ARGS --port P` with no API key; yields its base URL once healthy."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "splitfuse", "serve", *serve_args, "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, API_KEY_ENV: ""})
    try:
        wait_for_health(process, url, timeout_s)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=120)
