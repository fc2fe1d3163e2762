"""Load generator: streams a workload to an OpenAI-compatible server and records when every token arrives.

Sessions are sent by a closed loop (N clients, each waits for its previous
request) or on an open-loop schedule (Poisson, gamma, trace). A run is bounded:
no request is sent after ``max_duration_s``, and every request is cut off after
``request_timeout_s`` — so a run ends within max_duration_s + request_timeout_s
even against a server that stalls. Failures become records with ``error`` set.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional, Sequence

import aiohttp
import numpy as np
from tqdm import tqdm

from splitfuse.bench.arrivals import ArrivalConfig, TraceEntry, send_offsets
from splitfuse.bench.metrics import run_duration_s
from splitfuse.bench.records import RequestRecord
from splitfuse.bench.workloads import RequestSpec, Session

ENDPOINTS = ("completions", "chat")


def split_base_url(base_url: str) -> str:
    """The server root: 'http://h:8000/v1/' -> 'http://h:8000' (routes add '/v1/...')."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


@dataclass(frozen=True)
class ServerTarget:
    """Where and how to send: server root URL, model name, OpenAI route, per-request limit."""

    base_url: str
    model: str
    endpoint: str = "completions"
    request_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {self.endpoint!r}")

    @property
    def root_url(self) -> str:
        return split_base_url(self.base_url)

    @property
    def request_url(self) -> str:
        route = "chat/completions" if self.endpoint == "chat" else "completions"
        return f"{self.root_url}/v1/{route}"


def build_payload(spec: RequestSpec, target: ServerTarget) -> dict[str, Any]:
    """The JSON body: exactly ``max_tokens`` output tokens (ignore_eos + min_tokens), streamed, greedy."""
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": spec.max_tokens,
        "min_tokens": spec.max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.endpoint == "chat":
        if spec.prompt_text is None:
            raise ValueError("the chat endpoint needs text prompts (--prompt-format text)")
        body["messages"] = [{"role": "user", "content": spec.prompt_text}]
    else:
        # OpenAI's completions API accepts a prompt as a list of token ids; lengths stay exact.
        body["prompt"] = spec.prompt_text if spec.prompt_text is not None else list(spec.prompt_token_ids)
    return body


def _chunk_text(chunk: dict[str, Any], chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
    return text or ""


class _Sender:
    """Sends one request at a time on a shared HTTP session and appends its record."""

    def __init__(self, http: aiohttp.ClientSession, target: ServerTarget, start: float,
                 records: list[RequestRecord], progress: tqdm) -> None:
        self.http, self.target, self.start = http, target, start
        self.records, self.progress = records, progress

    def now(self) -> float:
        return time.perf_counter() - self.start

    async def send(self, spec: RequestSpec) -> RequestRecord:
        record = RequestRecord(
            request_id=spec.request_id, prompt_tokens=spec.num_prompt_tokens,
            requested_output_tokens=spec.max_tokens, send_time_s=self.now(),
            conversation_id=spec.conversation_id, turn=spec.turn,
        )
        self.records.append(record)  # appended first: a cancelled request is still counted
        try:
            async with asyncio.timeout(self.target.request_timeout_s):
                await self._post(spec, record)
        except TimeoutError:
            record.timed_out = True
            record.error = f"timeout: no complete answer within {self.target.request_timeout_s:g} s"
        except asyncio.CancelledError:
            record.error = "cancelled: the run was stopped"
            raise
        except Exception as exc:  # noqa: BLE001 — a bad answer fails its request, never the run
            record.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._finish(record)
        return record

    async def _post(self, spec: RequestSpec, record: RequestRecord) -> None:
        payload = build_payload(spec, self.target)
        async with self.http.post(self.target.request_url, json=payload) as response:
            if response.status != 200:
                body = (await response.text())[:300]
                record.error = f"HTTP {response.status}: {body}"
                return
            await self._read_stream(response, record)

    async def _read_stream(self, response: aiohttp.ClientResponse, record: RequestRecord) -> None:
        chat = self.target.endpoint == "chat"
        async for raw_line in response.content:
            line = raw_line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, SSE comments and keep-alives
            data = line[len(b"data:"):].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if not isinstance(chunk, dict):
                raise ValueError(f"SSE data is not a JSON object: {data[:100]!r}")
            if chunk.get("error"):
                record.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                return
            if _chunk_text(chunk, chat):
                record.token_times_s.append(self.now())
            usage = chunk.get("usage")
            if usage and usage.get("completion_tokens") is not None:
                record.output_tokens = int(usage["completion_tokens"])
                record.output_tokens_source = "usage"
                record.server_prompt_tokens = usage.get("prompt_tokens")

    def _finish(self, record: RequestRecord) -> None:
        record.end_time_s = self.now()
        if record.output_tokens_source != "usage":
            record.output_tokens = len(record.token_times_s)
        if record.error is None and not record.token_times_s:
            record.error = "no output tokens in the stream"
        self.progress.update(1)


@dataclass
class RunResult:
    """Records of one run, its duration (first send to last end) and when it began (UTC)."""

    records: list[RequestRecord]
    duration_s: float
    started_at: str


def run_load(
    target: ServerTarget,
    sessions: Sequence[Session],
    arrival: ArrivalConfig,
    max_duration_s: float,
    seed: int = 0,
    trace: Optional[Sequence[TraceEntry]] = None,
    show_progress: bool = True,
) -> RunResult:
    """Send ``sessions`` with ``arrival`` and return every request's record (blocking)."""
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    records = asyncio.run(_run_load(target, sessions, arrival, max_duration_s, seed, trace, show_progress))
    records.sort(key=lambda record: record.request_id)
    return RunResult(records, run_duration_s(records), started_at)


async def _run_load(target: ServerTarget, sessions: Sequence[Session], arrival: ArrivalConfig,
                    max_duration_s: float, seed: int, trace: Optional[Sequence[TraceEntry]],
                    show_progress: bool) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    total = sum(len(session) for session in sessions)
    # limit=0: the generator must never queue requests behind its own connection pool.
    connector = aiohttp.TCPConnector(limit=0)
    with tqdm(total=total, unit="req", disable=not show_progress, file=sys.stderr,
              desc=arrival.describe()) as progress:
        async with aiohttp.ClientSession(connector=connector, read_bufsize=1 << 20) as http:
            start = time.perf_counter()
            sender = _Sender(http, target, start, records, progress)
            deadline = start + max_duration_s
            if arrival.is_open_loop:
                offsets = send_offsets(arrival, len(sessions), np.random.default_rng(seed), trace)
                await _open_loop(sender, sessions, offsets, deadline)
            else:
                await _closed_loop(sender, sessions, arrival.concurrency, deadline)
    return records


async def _run_session(sender: _Sender, session: Session, deadline: float) -> None:
    # Turns of a conversation go one after another; none is sent after the deadline.
    for spec in session:
        if time.perf_counter() >= deadline:
            return
        await sender.send(spec)


async def _closed_loop(sender: _Sender, sessions: Sequence[Session], concurrency: int,
                       deadline: float) -> None:
    pending = deque(sessions)

    async def client() -> None:
        while pending and time.perf_counter() < deadline:
            await _run_session(sender, pending.popleft(), deadline)

    await asyncio.gather(*(client() for _ in range(concurrency)))


async def _open_loop(sender: _Sender, sessions: Sequence[Session], offsets: np.ndarray,
                     deadline: float) -> None:
    tasks = []
    for session, offset in zip(sessions, offsets):
        send_at = sender.start + float(offset)
        if send_at >= deadline:
            break
        delay = send_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_run_session(sender, session, deadline)))
    await asyncio.gather(*tasks)


def fetch_server_version(target: ServerTarget, timeout_s: float = 3.0) -> Optional[str]:
    """``GET {root}/version`` ('version' field, or the body), or None when the server has none."""
    import httpx  # only needed here; keeps the hot path on aiohttp

    try:
        response = httpx.get(f"{target.root_url}/version", timeout=timeout_s)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:100] or None
    return str(body.get("version")) if isinstance(body, dict) and "version" in body else str(body)[:100]


def fetch_first_model(base_url: str, timeout_s: float = 10.0) -> str:
    """The first id in ``GET {root}/v1/models`` (what vLLM's bench sends without --model); ValueError if none."""
    import httpx

    url = f"{split_base_url(base_url)}/v1/models"
    try:
        response = httpx.get(url, timeout=timeout_s)
        response.raise_for_status()
        models = response.json()["data"]
        return str(models[0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as error:
        detail = str(error) or type(error).__name__
        raise ValueError(f"cannot learn the served model from {url} ({detail}); pass --model") from None
