"""Profiles the engine's decode step: B requests of 128 prompt tokens, then torch.profiler over 10 steps.

    python benchmarks/profile_decode_step.py --batch 32            # op table
    py-spy record -o profile.svg -- python benchmarks/profile_decode_step.py --batch 32   # Python view
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from splitfuse.entrypoints.llm import LLM
from splitfuse.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="checkpoint directory (default: the demo model)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="decode steps timed before profiling")
    parser.add_argument("--attention-backend", default="auto", choices=("auto", "cpu-kernel", "torch"))
    args = parser.parse_args()

    engine = LLM(model=args.model, dtype="bfloat16", max_num_seqs=max(64, args.batch),
                 attention_backend=args.attention_backend).engine
    generator = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=0, max_tokens=args.steps + 64, ignore_eos=True, detokenize=False)
    for i in range(args.batch):
        engine.add_request(f"r{i}", torch.randint(100, 30000, (128,), generator=generator).tolist(), params)
    while engine.scheduler.waiting or any(r.num_output_tokens == 0 for r in engine.scheduler.running):
        engine.step()  # prefill everything, so what follows is decode only
    for _ in range(5):
        engine.step()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    step_s = (time.perf_counter() - start) / args.steps
    print(f"decode step, batch {args.batch}: {step_s * 1e3:.1f} ms -> {args.batch / step_s:.0f} output tok/s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
