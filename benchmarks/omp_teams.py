"""Why the server builds its engine on a throwaway thread: OpenMP teams per thread (libgomp).

Times the same parallel torch ops (a packed bf16 linear and an element-wise add) on the thread that
runs them, in three setups:

    main          : everything on the main thread
    thread        : the main thread ran parallel ops first (its worker team stays), then a new thread
                    runs the timed ops: the server's shape before the fix (model loaded on the main
                    thread, stepped on the engine thread)
    fresh-thread  : a helper thread ran the first ops and ended, then a new thread runs the timed ops
                    (the fix: AsyncLLMEngine.from_config loads the model on a thread that ends)

    python benchmarks/omp_teams.py
"""

from __future__ import annotations

import threading
import time

import torch

REPEATS = 2000


def _time_ops() -> str:
    weight = torch.ops.mkldnn._reorder_linear_weight(torch.randn(3072, 512).bfloat16(), 256)
    x = torch.randn(32, 512).bfloat16()
    big = torch.randn(512, 3072)

    def mean_us(op, repeats: int) -> float:
        for _ in range(50):
            op()
        start = time.perf_counter()
        for _ in range(repeats):
            op()
        return (time.perf_counter() - start) / repeats * 1e6

    linear_us = mean_us(lambda: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], ""), REPEATS)
    add_us = mean_us(lambda: big.add(1.0), REPEATS // 4)
    return f"linear 32x512x3072 {linear_us:7.1f} us   add 512x3072 fp32 {add_us:7.1f} us"


def _on_thread(function) -> None:
    thread = threading.Thread(target=function)
    thread.start()
    thread.join()


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'main':13s}", _time_ops())
    # The main thread's team now exists; a second thread starts a second team.
    _on_thread(lambda: print(f"{'thread':13s}", _time_ops()))
    print(f"{'main again':13s}", _time_ops())


def main_fresh() -> None:
    # Run in a separate process (see __main__): the main thread must not have run parallel ops.
    _on_thread(_time_ops)
    _on_thread(lambda: print(f"{'fresh-thread':13s}", _time_ops()))


if __name__ == "__main__":
    import multiprocessing

    main()
    process = multiprocessing.get_context("spawn").Process(target=main_fresh)
    process.start()
    process.join()
