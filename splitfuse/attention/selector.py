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
                             block_size: int) -> AttentionBackend:
    """name: auto, cpu-kernel or torch. Asking for cpu-kernel where it cannot run is an error."""
    if name == "torch":
        return TorchNativeBackend(device)
    if cpu_kernel_supported(dtype, device, arch.num_heads, arch.num_kv_heads, arch.head_dim, block_size):
        return CpuPagedBackend()
    if name == "cpu-kernel":
        raise ValueError(f"attention backend 'cpu-kernel' cannot serve this model here: it needs the CPU, "
                         f"bfloat16 or float32 (got {device.type}, {str(dtype).removeprefix('torch.')}), "
                         f"a working C compiler, and head_dim <= 256, block_size <= 64")
    if device.type == "cpu":
        logger.info("attention: torch-native backend (the CPU kernel does not apply here)")
    return TorchNativeBackend(device)
