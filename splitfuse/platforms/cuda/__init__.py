"""What CUDA (and any device but the CPU) runs: the attention backend and the ops, chosen here once.

    attention  auto: FlashInfer where ``flashinfer`` imports, else Triton where ``triton`` imports,
               else torch-native (SDPA); or one of them by name (--attention-backend)
    ops        the fused Triton kernels where ``triton`` imports, else the torch ops

Neither library is a dependency of the package (a CPU install has neither): each is imported only
here, when a model is built for a device that is not the CPU. SPLITFUSE_DISABLE_TRITON=1 keeps the
torch paths (attention and ops) for comparison. CUDA graphs of decode steps (``graphs.py``) need an
attention backend whose step metadata stays at fixed addresses: the Triton one
(``graph_safe``).
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from splitfuse.attention.backend import AttentionBackend
from splitfuse.attention.torch_native import TorchNativeBackend
from splitfuse.platforms.ops import TORCH_OPS, Ops

logger = logging.getLogger(__name__)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None and not os.environ.get("SPLITFUSE_DISABLE_TRITON")


def flashinfer_available() -> bool:
    return importlib.util.find_spec("flashinfer") is not None


def attention_backend(name: str, device: torch.device, num_kv_heads: int = 8) -> AttentionBackend:
    """``name``: auto, flashinfer, triton or torch (see the module docstring); a named backend that
    cannot run here is an error that says what is missing. ``num_kv_heads``: the model's (Triton's split heuristic)."""
    if name == "flashinfer" or (name == "auto" and flashinfer_available()):
        if not flashinfer_available():
            raise ValueError("attention backend 'flashinfer' needs the flashinfer package "
                             "(pip install flashinfer-python) and a CUDA device")
        from splitfuse.platforms.cuda.flashinfer_backend import FlashInferBackend  # noqa: PLC0415
        return FlashInferBackend(device)
    if name == "triton" or (name == "auto" and triton_available()):
        if not triton_available():
            raise ValueError("attention backend 'triton' needs the triton package (pip install triton) "
                             "and SPLITFUSE_DISABLE_TRITON unset")
        from splitfuse.platforms.cuda.triton_attention import TritonAttentionBackend  # noqa: PLC0415
        return TritonAttentionBackend(device, num_kv_heads=num_kv_heads)
    if name not in ("auto", "torch"):
        raise ValueError(f"attention backend {name!r} does not run on {device.type}: use auto, flashinfer, "
                         "triton or torch")
    if name == "auto":
        logger.info("attention on %s: torch-native (neither flashinfer nor triton imports)", device.type)
    return TorchNativeBackend(device)


def ops() -> Ops:
    if triton_available():
        from splitfuse.platforms.cuda.triton_ops import TRITON_OPS  # noqa: PLC0415
        return TRITON_OPS
    return TORCH_OPS
