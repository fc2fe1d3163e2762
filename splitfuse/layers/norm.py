"""RMSNorm as Llama-family checkpoints define it (normalize in fp32, scale in the model dtype)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from splitfuse.platforms.ops import RmsNormOp, torch_rms_norm


class RMSNorm(nn.Module):
    """``op``: the platform's ``ops.rms_norm`` where the inputs are 2-D rows of unit stride (hidden
    states); the torch op (the default) where they are not, e.g. q/k norms over strided head views."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, op: RmsNormOp = torch_rms_norm) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.op = op

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with a residual, (norm(x + residual), x + residual): the pre-norm block's add, fused."""
        return self.op(x, self.weight, self.eps, residual)
