"""Prepacked oneDNN linear layers for bf16 on CPU: weights reordered once at load, not on every call.

F.linear in bf16 on CPU lets oneDNN reorder the weight into its blocked (AMX) layout on
each call, which costs as much memory traffic as the matmul itself. Packing once makes
decode-sized matmuls 1.5-4x faster on this project's machines (docs/benchmarks.md).
Only bf16 on CPU is packed; fp32 gains nothing and keeps the plain path (and exact parity).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Packing is tuned for this many rows, but the packed weight serves any number of rows.
_BATCH_SIZE_HINT = 256


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = torch.zeros(8, 8, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(probe, 1)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 8, dtype=dtype), packed, None, "none", [], "")
    except (RuntimeError, AttributeError) as error:
        logger.info("oneDNN weight packing unavailable, using plain linear layers: %s", error)
        return False
    return True


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's packed layout (inference only, 2-D input)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(
            weight.detach(), _BATCH_SIZE_HINT), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linear_layers(module: nn.Module) -> int:
    """Replaces every nn.Linear under ``module`` with a PackedLinear; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child.weight, child.bias))
            count += 1
        else:
            count += pack_linear_layers(child)
    return count
