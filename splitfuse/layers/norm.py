"""RMSNorm as Llama-family checkpoints define it (normalize in fp32, scale in the model dtype)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from splitfuse.cpu_kernels import applies, load_cpu_kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with a residual, (norm(x + residual), x + residual): the pre-norm block's add, fused."""
        if x.dim() == 2 and applies(x, self.weight) and (residual is None or applies(residual)):
            kernels = load_cpu_kernels()
            if kernels is not None and (residual is None or residual.is_contiguous()):
                out = kernels.rms_norm(x, self.weight, self.eps, residual)
                return out if residual is None else (out, residual)
        if residual is not None:
            residual = x + residual
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
