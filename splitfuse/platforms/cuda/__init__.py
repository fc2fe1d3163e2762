"""What CUDA (and any device but the CPU) runs today: the torch-native attention backend and the torch ops.

Triton or FlashInfer kernels would be chosen here, in one place, when they come.
"""

from __future__ import annotations

import torch

from splitfuse.attention.torch_native import TorchNativeBackend
from splitfuse.platforms.ops import TORCH_OPS, Ops


def attention_backend(device: torch.device) -> TorchNativeBackend:
    return TorchNativeBackend(device)


def ops() -> Ops:
    return TORCH_OPS
