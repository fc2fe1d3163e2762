"""GPU memory sizing: how many KV blocks fit once the model is loaded and a full step has run, like vLLM.

The engine may use ``gpu_memory_utilization`` of the device's memory. A profiling forward of the
largest step (max_num_batched_tokens tokens, logits for max_num_seqs rows) on a one-block KV pool
shows the peak that weights and activations reach; memory that torch does not hold (the CUDA context,
other processes) counts too. What is left is the KV pool's.
"""

from __future__ import annotations

from typing import Callable

import torch

_GIB = 1 << 30


def kv_cache_bytes(total_bytes: int, utilization: float, peak_bytes: int) -> int:
    """The KV pool's bytes: utilization x total, less the profiled peak.

    80 GiB at 0.9 with a 20 GiB peak -> 52 GiB; a peak at or above the share is an error that says so.
    """
    available = int(total_bytes * utilization) - peak_bytes
    if available <= 0:
        raise ValueError(f"gpu_memory_utilization {utilization} of {total_bytes / _GIB:.1f} GiB leaves no room for "
                         f"the KV cache: the model and a full step take {peak_bytes / _GIB:.1f} GiB (raise "
                         "gpu_memory_utilization, lower max_num_batched_tokens, or give kv_cache_memory)")
    return available


def profile_peak_bytes(run_step: Callable[[], None], device: torch.device) -> tuple[int, int]:
    """(peak bytes in use during ``run_step``, the device's total bytes)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    run_step()
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    not_torch = total - free - torch.cuda.memory_reserved(device)  # the CUDA context, other processes
    return torch.cuda.max_memory_allocated(device) + max(0, not_torch), total
