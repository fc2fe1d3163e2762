"""Markdown tables of a run_serve_all.sh directory: splitfuse against a peer (vLLM by default), one per run.

    python benchmarks/serve_table.py benchmarks/results/<run>/serve
    python benchmarks/serve_table.py benchmarks/results/<run>/serve llama-bf16   # the peer's label
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import sys

RUNS = {"fixed": "clients (128 / 128)", "mixed": "clients (mixed)", "poisson": "rate req/s (mixed)"}


def _load(directory: str, server: str, run: str) -> dict | None:
    paths = sorted(glob.glob(os.path.join(directory, f"{server}-{run}-*.json*")))
    if not paths:
        return None
    opener = gzip.open if paths[-1].endswith(".gz") else open
    with opener(paths[-1], "rt") as f:
        return {point["sweep_value"]: point["metrics"] for point in json.load(f)["points"]}


def _ms(metrics: dict, name: str) -> str:
    return f"{metrics[name]['p50'] * 1e3:.1f} / {metrics[name]['p99'] * 1e3:.1f}"


def table(directory: str, run: str, peer: str = "vllm") -> str:
    ours, theirs = _load(directory, "splitfuse", run), _load(directory, peer, run)
    if ours is None or theirs is None:
        return ""
    name = "vLLM" if peer == "vllm" else peer
    lines = [f"| {RUNS[run]} | splitfuse out tok/s | {name} out tok/s | ratio | TTFT p50 / p99 ms (splitfuse) "
             f"| TTFT p50 / p99 ms ({name}) | TBT p50 / p99 ms (splitfuse) | TBT p50 / p99 ms ({name}) "
             f"| effective req/s at r = 4 tok/s (splitfuse / {name}) |", "|---" * 9 + "|"]
    for value in sorted(set(ours) & set(theirs)):
        a, b = ours[value], theirs[value]
        lines.append(f"| {value:g} | {a['output_tokens_per_s']:,.1f} | {b['output_tokens_per_s']:,.1f} "
                     f"| {a['output_tokens_per_s'] / b['output_tokens_per_s']:.2f}x | {_ms(a, 'ttft_s')} "
                     f"| {_ms(b, 'ttft_s')} | {_ms(a, 'tbt_s')} | {_ms(b, 'tbt_s')} "
                     f"| {a['effective_throughput']['4']['requests_per_s']:.2f} / "
                     f"{b['effective_throughput']['4']['requests_per_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    directory = sys.argv[1]
    peer = sys.argv[2] if len(sys.argv) > 2 else "vllm"
    for run in RUNS:
        text = table(directory, run, peer)
        if text:
            print(f"{run}:\n\n{text}\n")


if __name__ == "__main__":
    main()
