"""Does HTTP work starve the engine thread? Where an engine step's time goes, offline vs behind the server.

    python benchmarks/serve_load.py --model PATH [--num-requests 32 --prompt-tokens 64 --output-tokens 64]

The engine runs in a thread next to the asyncio HTTP server (splitfuse/engine/async_engine.py).
The worry with a thread is the GIL: while the event loop serializes SSE chunks, the
engine thread may wait for the GIL. The alternative, an engine-core process (vLLM v1),
avoids the GIL but pays IPC per step and competes for the same cores.

Measured on one workload (seeded random prompt ids, greedy, exact output lengths):

1. offline: LLMEngine stepped in a loop, no HTTP.
2. server: the same engine in AsyncLLMEngine behind the real app (uvicorn on 127.0.0.1,
   in a thread of this process), all requests streamed at once by a client *process*.

For every engine step (Linux: /proc/thread-self/schedstat) the wall time splits into
- cpu: the engine thread running (with --torch-threads 1 all compute is on this thread),
- runqueue: runnable but waiting for a core (CPU contention, a process split has it too),
- blocked: sleeping, which inside step() means waiting for the GIL.
"blocked" growing from (1) to (2) is what the thread design costs; a process split
would instead pay at least the pickle round-trip of one step's outputs (also reported).
Also reported: the server process's CPU outside engine steps per output token (the event
loop's HTTP/SSE work) and the client's. With --torch-threads > 1 these split numbers are
not exact: "blocked" then includes waiting for torch's worker threads, and their CPU time
lands in the HTTP figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

_LOWEST_PROMPT_TOKEN_ID = 10  # clear of BOS/EOS/PAD


class StepClock:
    """Accumulates wall / on-cpu / runqueue time of the calling thread over timed sections."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.num_steps = 0
        self.wall_s = self.cpu_s = self.runqueue_s = 0.0

    @staticmethod
    def _schedstat() -> tuple[float, float]:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
            on_cpu_ns, runqueue_ns, _ = map(int, f.read().split())
        return on_cpu_ns / 1e9, runqueue_ns / 1e9

    def time(self, fn: Any) -> Any:
        cpu0, queue0 = self._schedstat()
        wall0 = time.perf_counter()
        result = fn()
        self.wall_s += time.perf_counter() - wall0
        cpu1, queue1 = self._schedstat()
        self.cpu_s += cpu1 - cpu0
        self.runqueue_s += queue1 - queue0
        self.num_steps += 1
        return result

    def per_step_ms(self) -> dict[str, float]:
        n = max(self.num_steps, 1)
        return {"num_steps": self.num_steps, "wall_ms": 1e3 * self.wall_s / n, "cpu_ms": 1e3 * self.cpu_s / n,
                "runqueue_ms": 1e3 * self.runqueue_s / n,
                "blocked_ms": 1e3 * (self.wall_s - self.cpu_s - self.runqueue_s) / n}


def make_prompts(model: str, num_requests: int, prompt_tokens: int, seed: int) -> list[list[int]]:
    with open(os.path.join(model, "config.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    rng = np.random.default_rng(seed)
    return rng.integers(_LOWEST_PROMPT_TOKEN_ID, vocab_size, size=(num_requests, prompt_tokens)).tolist()


def engine_config(args: argparse.Namespace) -> Any:
    from splitfuse.config import EngineConfig

    kwargs = {"dtype": args.dtype, "max_num_seqs": args.num_requests,
              "max_num_batched_tokens": args.max_num_batched_tokens}
    return EngineConfig.from_kwargs(model=args.model, **{k: v for k, v in kwargs.items() if v is not None})


def sampling_params(args: argparse.Namespace) -> Any:
    from splitfuse.sampling_params import SamplingParams

    return SamplingParams(temperature=0, max_tokens=args.output_tokens, min_tokens=args.output_tokens,
                          ignore_eos=True)


def run_offline(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    from splitfuse.engine.llm_engine import LLMEngine
    from splitfuse.sampling_params import SamplingParams

    engine = LLMEngine.from_config(engine_config(args))
    engine.add_request("warmup", prompts[0][:16], SamplingParams(max_tokens=4))
    while engine.has_unfinished_requests():
        engine.step()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, sampling_params(args))
    clock, mid_outputs = StepClock(), None
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        outputs = clock.time(engine.step)
        if len(outputs) == len(prompts) and len(outputs[0].outputs[0].token_ids) == args.output_tokens // 2:
            mid_outputs = outputs  # a representative step for the IPC estimate
    wall_s = time.perf_counter() - started
    return {"wall_s": wall_s, "output_tokens_per_s": len(prompts) * args.output_tokens / wall_s,
            "step": clock.per_step_ms(), "ipc": ipc_estimate(mid_outputs) if mid_outputs else None}


def ipc_estimate(outputs: list[Any], repeats: int = 50) -> dict[str, float]:
    """Per-step cost of shipping one step's outputs to another process (pickle both ways, no socket)."""
    started = time.perf_counter()
    for _ in range(repeats):
        payload = pickle.dumps(outputs, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(payload)
    return {"pickle_roundtrip_ms": 1e3 * (time.perf_counter() - started) / repeats, "bytes": len(payload)}


async def stream_all(url: str, prompts: list[list[int]], output_tokens: int) -> list[dict[str, float]]:
    """All prompts at once as streaming completions; per request: TTFT, end-to-end time, SSE chunks."""
    import httpx

    async def one(client: httpx.AsyncClient, prompt: list[int]) -> dict[str, float]:
        body = {"prompt": prompt, "max_tokens": output_tokens, "min_tokens": output_tokens, "ignore_eos": True,
                "temperature": 0, "stream": True}
        started = time.perf_counter()
        first_s, chunks = None, 0
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                    first_s = first_s or time.perf_counter() - started
        return {"ttft_s": first_s or float("nan"), "e2e_s": time.perf_counter() - started, "chunks": chunks}

    limits = httpx.Limits(max_connections=len(prompts) + 1)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        return await asyncio.gather(*(one(client, p) for p in prompts))


def _client_process(url: str, args: argparse.Namespace) -> subprocess.Popen:
    # The load generator lives in its own process, as real clients do, so its parsing work
    # competes for cores but not for this process's GIL.
    code = ("import asyncio, json, sys\n"
            f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
            "import serve_load\n"
            f"prompts = serve_load.make_prompts({args.model!r}, {args.num_requests}, {args.prompt_tokens}, {args.seed})\n"
            f"asyncio.run(serve_load.stream_all({url!r}, prompts[:1], 4))\n"
            "print('ready', flush=True); sys.stdin.readline()\n"
            "import time; cpu0 = time.process_time()\n"
            f"results = asyncio.run(serve_load.stream_all({url!r}, prompts, {args.output_tokens}))\n"
            "print(json.dumps({'requests': results, 'cpu_s': time.process_time() - cpu0}))\n")
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def run_server(args: argparse.Namespace) -> dict[str, Any]:
    from splitfuse.engine.async_engine import AsyncLLMEngine, run_in_thread
    from splitfuse.engine.llm_engine import LLMEngine
    from splitfuse.entrypoints.openai.server import ServerThread, build_app

    clock = StepClock()

    class TimedAsyncLLMEngine(AsyncLLMEngine):
        def _step(self) -> None:  # runs on the engine thread
            clock.time(super()._step)

    engine = TimedAsyncLLMEngine(run_in_thread(LLMEngine.from_config, engine_config(args)))
    with ServerThread(build_app(engine, ["bench"])) as server:
        client = _client_process(server.url, args)
        try:
            assert client.stdout.readline().strip() == "ready"
            clock.reset()  # forget the warm-up
            started, process_cpu0 = time.perf_counter(), time.process_time()
            client.stdin.write("go\n")
            client.stdin.flush()
            client_report = json.loads(client.stdout.readline())
            wall_s = time.perf_counter() - started
            server_cpu_s = time.process_time() - process_cpu0
        finally:
            client.kill()
            client.wait()
    per_request = client_report["requests"]
    ttfts = sorted(r["ttft_s"] for r in per_request)
    num_tokens = args.num_requests * args.output_tokens
    return {"wall_s": wall_s, "output_tokens_per_s": num_tokens / wall_s,
            "step": clock.per_step_ms(), "ttft_p50_s": ttfts[len(ttfts) // 2], "ttft_max_s": ttfts[-1],
            "sse_chunks_per_request": statistics.fmean(r["chunks"] for r in per_request),
            # CPU outside engine steps in the server process: the event loop's HTTP/SSE work, mostly.
            "http_cpu_us_per_token": 1e6 * (server_cpu_s - clock.cpu_s) / num_tokens,
            "client_cpu_us_per_token": 1e6 * client_report["cpu_s"] / num_tokens}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median step wall time (a shared machine makes single runs noisy)."""
    return sorted(runs, key=lambda run: run["step"]["wall_ms"])[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the default model's, converted)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads (1: all compute on the engine thread, so its CPU time is exact)")
    parser.add_argument("--repeats", type=int, default=3, help="offline/server pairs, alternated; medians reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    if args.model is None:
        from splitfuse.models.sources import resolve_model

        args.model = resolve_model("").path
    import torch

    from splitfuse.engine.async_engine import run_in_thread

    torch.set_num_threads(args.torch_threads)
    prompts = make_prompts(args.model, args.num_requests, args.prompt_tokens, args.seed)
    offline_runs, server_runs = [], []
    for _ in range(args.repeats):
        # Offline on a thread of its own, and the server's engine built on one (as AsyncLLMEngine.from_config
        # does): the main thread must never start OpenMP work (benchmarks/omp_teams.py).
        offline_runs.append(run_in_thread(run_offline, args, prompts))
        server_runs.append(run_server(args))
    offline, server = median_run(offline_runs), median_run(server_runs)
    result: dict[str, Any] = {
        "workload": {k: v for k, v in vars(args).items() if k != "out"}, "cpu_count": os.cpu_count(),
        "offline": offline, "server": server,
        "gil_wait_added_ms_per_step": server["step"]["blocked_ms"] - offline["step"]["blocked_ms"],
        "all_runs": {"offline": offline_runs, "server": server_runs}}
    if offline["ipc"]:
        result["process_split_pickle_ms_per_step"] = offline["ipc"]["pickle_roundtrip_ms"]
    print(json.dumps({k: v for k, v in result.items() if k != "all_runs"}, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
