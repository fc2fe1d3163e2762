"""Times one attention layer call: the CPU kernel backend against the torch-native one (demo model shapes).

    python benchmarks/attention_kernel.py

Cases: B decodes at a context length, and one prompt chunk of Q new tokens after C cached ones.
With --route kernel|sdpa the CPU backend is forced to one path for the chunk cases (to place
KERNEL_MAX_QUERY_TOKENS).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from splitfuse.attention.backend import BatchLayout
from splitfuse.attention.torch_native import TorchNativeBackend
from splitfuse.platforms import resolve_platform
from splitfuse.platforms.cpu import attention as cpu_paged
from splitfuse.platforms.cpu.attention import CpuPagedBackend

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 8, 4, 64, 16


def make_batch(requests: list[tuple[int, int]], num_blocks: int, generator: torch.Generator):
    """requests: (cached tokens, new tokens). Blocks are scattered at random over the pool."""
    permutation = torch.randperm(num_blocks, generator=generator).numpy()
    query_lens = np.array([q for _, q in requests])
    context_lens = np.array([c + q for c, q in requests])
    max_blocks = int(-(-context_lens.max() // BLOCK_SIZE))
    block_tables = permutation[:len(requests) * max_blocks].reshape(len(requests), max_blocks).astype(np.int64)
    slots = []
    for i, (cached, new) in enumerate(requests):
        positions = np.arange(cached, cached + new)
        slots.append(block_tables[i, positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE)
    return BatchLayout(query_lens=query_lens, context_lens=context_lens,
                       query_start_loc=np.concatenate([[0], np.cumsum(query_lens)]), block_tables=block_tables,
                       slot_mapping=torch.from_numpy(np.concatenate(slots)),
                       num_decodes=int((query_lens == 1).sum()), block_size=BLOCK_SIZE)


def time_backend(backend, layout: BatchLayout, kv_cache, generator: torch.Generator, repeats: int) -> float:
    tokens = int(layout.query_lens.sum())
    query = torch.randn(tokens, NUM_HEADS, HEAD_DIM, generator=generator).bfloat16()
    key = torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, generator=generator).bfloat16()
    value = torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, generator=generator).bfloat16()
    metadata = backend.plan(layout, (None,))
    for _ in range(3):
        backend.forward(query, key, value, kv_cache, metadata, scale=HEAD_DIM ** -0.5, sliding_window=None)
    start = time.perf_counter()
    for _ in range(repeats):
        backend.forward(query, key, value, kv_cache, metadata, scale=HEAD_DIM ** -0.5, sliding_window=None)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--route", choices=("auto", "kernel", "sdpa"), default="auto")
    args = parser.parse_args()
    if args.route == "kernel":
        cpu_paged.KERNEL_MAX_QUERY_TOKENS = 1 << 30
    elif args.route == "sdpa":
        cpu_paged.KERNEL_MAX_QUERY_TOKENS = 1
    generator = torch.Generator().manual_seed(0)
    num_blocks = 8192
    kv_cache = tuple(torch.randn(num_blocks * BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=generator).bfloat16()
                     for _ in range(2))
    cases = {f"{b} decodes at context {c}": [(c - 1, 1)] * b for b, c in [(1, 256), (32, 192), (64, 512)]}
    cases.update({f"chunk of {q} after {c} cached": [(c, q)] for c, q in [(0, 16), (0, 64), (0, 256), (0, 512),
                                                                            (256, 64), (256, 256)]})
    kernels = resolve_platform(torch.device("cpu"), torch.bfloat16).kernels
    if kernels is None:
        raise SystemExit("the CPU kernels are not available here (no C compiler, or SPLITFUSE_DISABLE_CPU_KERNELS)")
    torch_native, cpu_kernel = TorchNativeBackend(torch.device("cpu")), CpuPagedBackend(kernels)
    print(f"{'case':34} {'torch-native ms':>16} {'cpu kernel ms':>14} {'ratio':>6}")
    for name, requests in cases.items():
        layout = make_batch(requests, num_blocks, generator)
        native_s = time_backend(torch_native, layout, kv_cache, generator, args.repeats)
        kernel_s = time_backend(cpu_kernel, layout, kv_cache, generator, args.repeats)
        print(f"{name:34} {native_s * 1e3:16.3f} {kernel_s * 1e3:14.3f} {native_s / kernel_s:6.2f}")


if __name__ == "__main__":
    main()
