"""The ops a model's layers call, chosen once per platform (``Ops``), and their portable torch implementations.

Each op is a plain callable with one contract for every implementation: the torch ones below (CUDA,
fp16, a CPU without the C kernels) and the C kernel wrappers (``platforms/cpu/ops.py``). A layer is
handed its op when the model is built and calls it without asking again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

# rms_norm(x, weight, eps, residual) -> norm(x), or with a residual (norm(x + residual), x + residual).
RmsNormOp = Callable[[torch.Tensor, torch.Tensor, float, Optional[torch.Tensor]],
                     Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]
# rotary(positions [T], query [T, H, D], key [T, KVH, D], cos, sin [max_position, D / 2]) -> (query, key).
RotaryOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                    tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Ops:
    rms_norm: RmsNormOp
    rotary: RotaryOp
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]  # [T, 2I] -> silu(gate) * up [T, I]
    argmax: Callable[[torch.Tensor], torch.Tensor]  # [rows, vocab] -> int64 [rows], the first index of the max


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Normalize in fp32, scale in the model dtype (as Llama-family checkpoints define it)."""
    if residual is not None:
        residual = x + residual
        return _norm(residual, weight, eps), residual
    return _norm(x, weight, eps)


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def torch_rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half (NeoX) layout; returns rotated copies."""
    cos = cos[positions].unsqueeze(1)
    sin = sin[positions].unsqueeze(1)
    return rotate(query, cos, sin), rotate(key, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1 = x[..., :half].float()
    x2 = x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def torch_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
    return F.silu(gate) * up


def torch_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The first index on ties (as vLLM and transformers pick)."""
    # max() on fp32 is several times faster than argmax on bf16 on CPU.
    return logits.float().max(dim=-1).indices


TORCH_OPS = Ops(rms_norm=torch_rms_norm, rotary=torch_rotary, silu_and_mul=torch_silu_and_mul,
                argmax=torch_argmax)
