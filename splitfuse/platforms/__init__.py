"""The platform: what runs a model on a device and dtype, decided once when the model is built.

``resolve_platform`` reads the environment's switches (SPLITFUSE_DISABLE_CPU_KERNELS,
SPLITFUSE_DISABLE_AMX) here and nowhere else, builds or loads the C kernels once, and chooses the
attention backend (``--attention-backend``), the ops the layers call (C kernels or torch), how
linear layers are prepacked, and whether a step's decoder layers may run in one C call. The model
is built with the ``Platform``; each layer keeps the op it was handed and never asks again.

    CPU, bf16 or fp32, a C compiler -> paged C attention, C ops; bf16: packed linears (AMX where it is)
    CPU otherwise (fp16, no compiler)-> torch-native attention, torch ops
    CUDA (any other device)          -> platforms/cuda: FlashInfer, Triton or torch-native attention;
                                        Triton or torch ops (whichever imports)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from splitfuse.attention.backend import AttentionBackend
from splitfuse.attention.torch_native import TorchNativeBackend
from splitfuse.platforms import cuda
from splitfuse.platforms.cpu.attention import CpuPagedBackend, cpu_kernel_supported
from splitfuse.platforms.cpu.decoder import CpuDecoder
from splitfuse.platforms.cpu.kernels import DTYPE_CODES, CpuKernels, build_cpu_kernels
from splitfuse.platforms.cpu.linear import ROW_TILE, LinearPacker, packing_supported
from splitfuse.platforms.cpu.ops import kernel_ops
from splitfuse.platforms.ops import TORCH_OPS, Ops

if TYPE_CHECKING:
    from splitfuse.models.config import ArchConfig

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Platform:
    device: torch.device
    dtype: torch.dtype
    batch_invariant: bool  # as asked; the torch attention backend cannot keep it (it logs so)
    attention_backend: AttentionBackend
    ops: Ops  # what the layers call: the C kernels' wrappers or the torch ops
    kernels: Optional[CpuKernels]  # the C kernels this platform runs; None: torch ops only
    linears: Optional[LinearPacker]  # how linear layers are prepacked at load; None: plain nn.Linear

    @property
    def row_tile(self) -> Optional[int]:
        """The one row count of a bf16 matmul call on the CPU when batch invariance is asked, else None.

        oneDNN picks its kernel (and its rounding) by row count whether the layers were packed or not
        (no AVX-512: torch's plain bf16 linear), so layers that see varying rows, like experts, run in tiles.
        """
        if self.linears is not None:
            return self.linears.row_tile
        return ROW_TILE if self.batch_invariant and self.device.type == "cpu" and self.dtype == torch.bfloat16 \
            else None

    @property
    def uses_amx(self) -> bool:
        """Whether linear layers run on the AMX kernel (where it takes their weights)."""
        return self.linears is not None and self.linears.amx is not None

    def fused_decoder(self, model: nn.Module) -> Optional[CpuDecoder]:
        """The model's decoder layers in one C call, where this platform and the packed model allow it."""
        if self.linears is None or self.linears.amx is None:
            return None
        return CpuDecoder.build(model, self.linears.amx)


def resolve_platform(device: torch.device, dtype: torch.dtype, *, attention_backend: str = "auto",
                     batch_invariant: bool = False, arch: Optional[ArchConfig] = None,
                     block_size: Optional[int] = None) -> Platform:
    """Everything that runs a model of ``dtype`` on ``device``, chosen now (see the module docstring).

    ``attention_backend``: auto, cpu-kernel, torch, or on CUDA triton / flashinfer; asking for one where
    it cannot run is an error. ``arch`` and ``block_size``: the model's attention shape and the KV block size, checked
    against the C attention kernel's limits (either None: not checked, as kernel tests want).
    """
    if device.type != "cpu":
        if attention_backend == "cpu-kernel":
            _attention_backend(attention_backend, device, dtype, None, batch_invariant)  # raises: names why
        _warn_not_invariant(batch_invariant, f"attention on {device.type}")
        backend = cuda.attention_backend(attention_backend, device, arch.num_kv_heads if arch is not None else 8)
        return Platform(device, dtype, batch_invariant, backend, cuda.ops(), None, None)
    if attention_backend in ("triton", "flashinfer"):
        raise ValueError(f"attention backend {attention_backend!r} runs on CUDA only (this model is on the CPU)")
    kernels = None
    if dtype in DTYPE_CODES and not _env_flag("SPLITFUSE_DISABLE_CPU_KERNELS"):
        kernels = build_cpu_kernels()
    fits = kernels is not None and cpu_kernel_supported(kernels, arch, block_size)
    backend = _attention_backend(attention_backend, device, dtype, kernels if fits else None, batch_invariant)
    linears = None
    if packing_supported(device, dtype):
        amx = kernels is not None and kernels.amx_available and not _env_flag("SPLITFUSE_DISABLE_AMX")
        linears = LinearPacker(kernels if amx else None, batch_invariant)
    ops = TORCH_OPS if kernels is None else kernel_ops(kernels)
    return Platform(device, dtype, batch_invariant, backend, ops, kernels, linears)


def _env_flag(name: str) -> bool:
    return bool(os.environ.get(name))


def _attention_backend(name: str, device: torch.device, dtype: torch.dtype, kernels: Optional[CpuKernels],
                       batch_invariant: bool) -> AttentionBackend:
    """kernels: the C kernels where their attention can serve this model, else None.

    ``batch_invariant`` holds only on the cpu-kernel backend (platforms/cpu/attention.py): SDPA's
    results depend on the shapes it is given, so the torch backend cannot keep it.
    """
    if name == "torch":
        _warn_not_invariant(batch_invariant, "--attention-backend torch")
        return TorchNativeBackend(device)
    if kernels is not None:
        return CpuPagedBackend(kernels, batch_invariant)
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
