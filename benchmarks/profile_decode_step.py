"""Profiles the engine's decode step: B requests of P prompt tokens, then torch.profiler over 10 steps.

    python benchmarks/profile_decode_step.py --batch 32            # op table
    python benchmarks/profile_decode_step.py --batch 32 --prompt-tokens 256 --per-call   # + the C kernels
    py-spy record -o profile.svg -- python benchmarks/profile_decode_step.py --batch 32   # Python view
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

from splitfuse.entrypoints.llm import LLM
from splitfuse.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="checkpoint directory, .gguf file or built-in name (default: the default model)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="decode steps timed before profiling")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--attention-backend", default="auto", choices=("auto", "cpu-kernel", "torch"))
    parser.add_argument("--per-call", action="store_true",
                        help="also time each layer-level call (the C kernels do not show in torch.profiler)")
    args = parser.parse_args()

    engine = LLM(model=args.model, dtype="bfloat16", max_num_seqs=max(64, args.batch),
                 attention_backend=args.attention_backend).engine
    generator = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=0, max_tokens=2 * args.steps + 64, ignore_eos=True, detokenize=False)
    for i in range(args.batch):
        prompt = torch.randint(100, 30000, (args.prompt_tokens,), generator=generator).tolist()
        engine.add_request(f"r{i}", prompt, params)
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
    if args.per_call:
        per_call(engine, args.steps)


def per_call(engine, steps: int) -> None:
    """Wall time per step of each layer-level call, with a timer around each (adds ~1 us per call)."""
    from splitfuse.platforms.cpu.decoder import CpuDecoder
    from splitfuse.platforms.cpu.kernels import CpuKernels
    from splitfuse.platforms.cpu.linear import AmxLinear, PackedLinear

    totals: collections.Counter[str] = collections.Counter()
    targets = [(CpuKernels, name) for name in ("rms_norm", "silu_and_mul", "rotary_embedding", "write_kv_cache")]
    # CpuDecoder.run: all decoder layers of a step in one C call, where it applies (bf16 on AMX CPUs).
    targets += [(PackedLinear, "forward"), (AmxLinear, "forward"), (CpuDecoder, "run"),
                (type(engine.engine_core.executor.runner.backend), "forward"),
                (type(engine.engine_core.executor.runner.model), "compute_logits"), (type(engine.engine_core.executor.runner.sampler), "__call__"),
                (type(engine.engine_core.executor.runner), "execute_model"), (type(engine.engine_core.scheduler), "schedule")]
    for owner, name in targets:
        original = getattr(owner, name)

        def timed(*args, _original=original, _label=f"{owner.__name__}.{name}", **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_label] += time.perf_counter() - start

        setattr(owner, name, timed)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    print(f"per step: {(time.perf_counter() - start) / steps * 1e3:.2f} ms wall; per call site:")
    for label, seconds in totals.most_common():
        print(f"  {label:32s} {seconds / steps * 1e3:7.3f} ms")


if __name__ == "__main__":
    main()
