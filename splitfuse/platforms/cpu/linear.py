"""Prepacked linear layers for bf16 on CPU: weights reordered once at load, not on every call.

``LinearPacker.pack`` picks one of two kinds per weight:

- ``AmxLinear``, where the platform runs AMX and the input size is a multiple of 32: this project's
  kernel (csrc/amx_linear.c) over a weight packed into AMX tiles. At decode sizes it is faster
  than oneDNN, most with the weight in cache, and it compiles nothing per row count.
- ``PackedLinear`` elsewhere: oneDNN with a prepacked weight. F.linear in bf16 on CPU lets oneDNN
  reorder the weight into its blocked (AMX) layout on each call, which costs as much memory
  traffic as the matmul itself; packing once makes decode-sized matmuls several times faster
  (docs/benchmarks.md has the figures).

Only bf16 on CPU is packed; fp32 gains nothing and keeps the plain path (and exact parity).

oneDNN compiles a kernel for every new number of rows (milliseconds the first time; a cache of
1,024 kernels after that), and a step's row count is its token count, which varies from step
to step. So a model with ``PackedLinear`` layers runs at a few row counts only (``padded_rows``:
the runner pads the batch with dummy tokens), and ``warm_up`` compiles all of them once at load.

Batch invariance (a row's result independent of how many rows the call has): the AMX kernel has it
by construction (each output is one tile dot-product chain over K, whatever the tile's rows);
oneDNN picks its kernel, and so its rounding, by row count, so a ``PackedLinear`` with ``row_tile``
runs every call as calls of exactly ``ROW_TILE`` rows (the last one padded), one shape for all.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from splitfuse.platforms.cpu.kernels import CpuKernels, amx_packed_columns

logger = logging.getLogger(__name__)

# Packing is tuned for this many rows, but the packed weight serves any number of rows.
_BATCH_SIZE_HINT = 256
# The one row count of a batch-invariant PackedLinear's oneDNN calls: a batch-32 decode step is one
# call per layer; a smaller step pays for 32 rows, a prompt chunk for many 32-row calls instead of one
# better-blocked call. Any fixed count would be invariant; 32 measured better than 64 or 128.
ROW_TILE = 32


def in_row_tiles(linear: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int) -> torch.Tensor:
    """linear(x) computed as calls of exactly ``tile`` rows (the last one zero-padded): one matmul shape.

    70 rows, tile 32 -> rows 0-31 and 32-63 as they are, 64-69 padded to 32 rows.
    """
    rows = x.shape[0]
    if rows == tile:
        return linear(x)
    full = rows - rows % tile
    pieces = [linear(x[start:start + tile]) for start in range(0, full, tile)]
    if full < rows:
        padded = x.new_zeros(tile, x.shape[1])
        padded[:rows - full] = x[full:]
        pieces.append(linear(padded)[:rows - full])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


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
    """y = x W^T + b with W held in oneDNN's packed layout (inference only, 2-D input).

    ``row_tile``: every oneDNN call gets exactly this many rows (batch invariance, see the module docstring).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, row_tile: int | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.row_tile = row_tile
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(
            weight.detach(), _BATCH_SIZE_HINT), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_tile is None:
            return self._linear(x)
        return in_row_tiles(self._linear, x, self.row_tile)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                + (f", row_tile={self.row_tile}" if self.row_tile else ""))


class AmxLinear(nn.Module):
    """y = x W^T + b with W in the AMX kernel's tile layout (inference only, 2-D bf16 input).

    ``silu_mul=True`` makes it a gated MLP's first half: W is gate_up's [gate; up] weight
    [2I, H], and forward returns silu(x gate^T) * (x up^T) [T, I] straight from the kernel,
    never writing the [T, 2I] product (the kernel reads gate and up in alternating blocks of 16).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernels: CpuKernels,
                 silu_mul: bool = False) -> None:
        super().__init__()
        out_features, self.in_features = weight.shape
        self.kernels, self.silu_mul = kernels, silu_mul
        if silu_mul:
            self.out_features = out_features // 2
            if out_features % 32:
                raise ValueError(f"silu_mul wants gate and up sizes in a multiple of 16, not {self.out_features}")
            order = gate_up_order(self.out_features)
            weight, bias = weight[order], None if bias is None else bias[order]
        else:
            self.out_features = out_features
        self.register_buffer("packed_weight", kernels.pack_amx_weight(weight.detach()), persistent=False)
        padded_bias = None
        if bias is not None:  # fp32, zero-padded like the weight's columns: the kernel adds it before rounding
            padded_bias = torch.zeros(amx_packed_columns(out_features), dtype=torch.float32)
            padded_bias[:out_features] = bias.detach().float()
        self.register_buffer("bias", padded_bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.amx_linear(x, self.packed_weight, self.bias, self.out_features, self.silu_mul)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                + (", silu_mul=True" if self.silu_mul else ""))


def gate_up_order(intermediate: int) -> torch.Tensor:
    """Row order of a [gate; up] weight in alternating blocks of 16: gate 0-15, up 0-15, gate 16-31, ..."""
    blocks = torch.arange(intermediate).view(-1, 16)
    return torch.stack([blocks, blocks + intermediate], dim=1).reshape(-1)


@dataclass(frozen=True)
class LinearPacker:
    """How a platform prepacks linear layers at load (bf16 on CPU): the decisions, made once, and the packing.

    ``amx``: the kernels to run AMX layers on, None where the platform does not use AMX (no AMX here,
    or SPLITFUSE_DISABLE_AMX). ``batch_invariant``: oneDNN layers run at ``ROW_TILE`` rows only (the
    AMX kernel needs nothing for it).
    """

    amx: Optional[CpuKernels] = None
    batch_invariant: bool = False

    @property
    def row_tile(self) -> Optional[int]:
        """The one row count of a oneDNN call, or None where any row count goes."""
        return ROW_TILE if self.batch_invariant else None

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None, gate_up: bool = False
             ) -> AmxLinear | PackedLinear:
        """The faster prepacked layer for this weight: AMX where the kernel takes it, else oneDNN.

        ``gate_up``: the weight is a gated MLP's [gate; up]; on AMX (with gate and up sizes a multiple
        of 16) the layer then returns silu(gate) * up itself (``AmxLinear.silu_mul``).
        """
        if self.amx is not None and self.amx.amx_takes(weight):
            return AmxLinear(weight, bias, self.amx, silu_mul=gate_up and weight.shape[0] % 32 == 0)
        return PackedLinear(weight, bias, self.row_tile)

    def pack_layers(self, module: nn.Module) -> int:
        """Replaces every nn.Linear under ``module`` with a prepacked layer (``pack``); returns how many.

        A layer named ``gate_up_proj`` (``GatedMLP``'s [gate; up]) is packed with ``gate_up=True``.
        """
        count = 0
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, self.pack(child.weight, child.bias, gate_up=name == "gate_up_proj"))
                count += 1
            else:
                count += self.pack_layers(child)
        return count


def padded_rows(rows: int) -> int:
    """The row count a packed matmul runs at: exact up to 8, then a multiple of 8 up to 64, then of 64.

    1 -> 1, 9 -> 16, 65 -> 128, 500 -> 512. Up to a few hundred rows a matmul reads its weight
    once whatever the rows, so padding there costs little; past that, at most 63 rows of work.
    """
    if rows <= 8:
        return rows
    step = 8 if rows <= 64 else 64
    return -(-rows // step) * step


def row_buckets(max_rows: int) -> list[int]:
    """Every padded row count of 1..max_rows: row_buckets(20) -> [1, 2, ..., 8, 16, 24]."""
    return sorted({padded_rows(rows) for rows in range(1, max_rows + 1)})


# Compiling a kernel takes up to ~12 ms; a matmul of 2**33 multiply-adds takes several times that on a
# CPU, so bigger ones are not worth running at load (a large model would spend minutes warming up).
_WARM_UP_MAX_MACS = 1 << 33


def warm_up(module: nn.Module, max_rows: int, logits: PackedLinear | None = None, max_logit_rows: int = 0) -> float:
    """Runs each distinct packed layer shape under ``module`` once per row bucket; returns the seconds taken.

    Layers that share a shape share oneDNN's kernels, so one of each is enough; ``logits`` (the
    lm_head, which sees only the rows that sample) is warmed up to ``max_logit_rows``. Buckets
    whose matmul exceeds _WARM_UP_MAX_MACS are skipped.
    """
    started = time.perf_counter()
    shapes: dict[tuple[int, int, bool], PackedLinear] = {}
    for child in module.modules():
        if isinstance(child, PackedLinear):
            shapes.setdefault((child.in_features, child.out_features, child.bias is not None), child)
    jobs = [(layer, max_rows) for layer in shapes.values()]
    if logits is not None:
        jobs.append((logits, max_logit_rows))
    with torch.inference_mode():
        for layer, rows_limit in jobs:
            dtype = layer.packed_weight.dtype
            for rows in [layer.row_tile] if layer.row_tile else row_buckets(rows_limit):
                if rows * layer.in_features * layer.out_features > _WARM_UP_MAX_MACS:
                    break  # the matmul itself now dwarfs compiling it: leave these to the first step
                layer(torch.zeros(rows, layer.in_features, dtype=dtype))
    return time.perf_counter() - started
