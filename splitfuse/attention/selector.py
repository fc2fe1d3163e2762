"""Picks the paged attention backend for a model on a device (``--attention-backend``)."""

from __future__ import annotations

import logging

import torch

from splitfuse.attention.backend import AttentionBackend
from splitfuse.attention.cpu_paged import CpuPagedBackend, cpu_kernel_supported
from splitfuse.attention.torch_native import TorchNativeBackend
from splitfuse.models.config import ArchConfig

logger = logging.getLogger(__name__)


def select_attention_backend(name: str, arch: ArchConfig, dtype: torch.dtype, device: torch.device,
                             block_size: int, batch_invariant: bool = False) -> AttentionBackend:
    """name: auto, cpu-kernel or torch. Asking for cpu-kernel where it cannot run is an error.

    ``batch_invariant`` holds only on the cpu-kernel backend (see attention/cpu_paged.py): SDPA's
    results depend on the shapes it is given, so the torch backend cannot keep it.
    """
    if name == "torch":
        _warn_not_invariant(batch_invariant, "--attention-backend torch")
        return TorchNativeBackend(device)
    if cpu_kernel_supported(dtype, device, arch.num_heads, arch.num_kv_heads, arch.head_dim, block_size):
        return CpuPagedBackend(batch_invariant)
    if name == "cpu-kernel":
        raise ValueError(f"attention backend 'cpu-kernel' cannot serve this model here: it needs the CPU, "
                         f"bfloat16 or float32 (got {device.type}, {str(dtype).removeprefix('torch.')}), "
                         f"a working C compiler, and head_dim <= 256, block_size <= 64")
    if device.type == "cpu":
        logger.info("attention: torch-native backend (the CPU kernel does not apply here)")
    _warn_not_invariant(batch_invariant, "the torch attention backend")
    return TorchNativeBackend(device)


def _warn_not_invariant(batch_invariant: bool, reason: str) -> None:
    if batch_invariant:
        logger.info("batch_invariant does not hold with %s: a request's tokens may depend on its batch", reason)
