"""The layers' ops on the C kernels (``Ops`` over ``CpuKernels``), for CPU models in bf16 or fp32.

The platform chooses these only where every call gets what the kernels take: CPU tensors of the
model's dtype, each row of unit stride (the model's hidden states, the fused qkv output's head views,
the logits), int64 positions and fp32 cos/sin tables. q/k norms read strided 3-D head views and keep
the torch op (``models/llama.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from splitfuse.platforms.cpu.kernels import CpuKernels
from splitfuse.platforms.ops import Ops


def kernel_ops(kernels: CpuKernels) -> Ops:
    """Each op looks its ``CpuKernels`` method up when called, so a profiler that wraps the class sees every call."""

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = kernels.rms_norm(x, weight, eps, residual)  # residual, when given, now holds x + residual
        return out if residual is None else (out, residual)

    def rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kernels.rotary_embedding(positions, query, key, cos, sin)  # in place
        return query, key

    def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        return kernels.silu_and_mul(gate_up)

    def argmax(logits: torch.Tensor) -> torch.Tensor:
        return kernels.argmax(logits)

    return Ops(rms_norm=rms_norm, rotary=rotary, silu_and_mul=silu_and_mul, argmax=argmax)
