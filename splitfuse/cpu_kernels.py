"""Builds and loads the C kernels in ``csrc/`` for the CPU, once per machine, cached on disk.

The sources are compiled with the machine's C compiler (``cc``, or $CC) and ``-march=native``
into ``<cache root>/kernels/<hash>.so``; the hash covers the sources, the flags, the compiler
and the CPU, so a cache shared between machines never loads code built for another CPU.
No compiler, a failed build or SPLITFUSE_DISABLE_CPU_KERNELS=1 gives None, and callers use
torch ops instead. ``CpuKernels`` wraps the C functions for tensors.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Optional

import torch  # loads torch's OpenMP runtime first, so the kernels share its thread pool

from splitfuse.models.sources import default_cache_root

logger = logging.getLogger(__name__)

_CSRC = os.path.join(os.path.dirname(__file__), "csrc")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c11"]
# source -> its own flags. fast-math lets the element-wise loops (exp included) vectorize; the
# attention kernel relies on -inf comparisons, which fast-math may drop, so it gets none.
_SOURCES = {"paged_attention.c": ["-fno-math-errno"], "fused_ops.c": ["-ffast-math"], "amx_linear.c": [],
            "decoder.c": []}
if platform.machine() in ("x86_64", "AMD64"):
    # gcc vectorizes with 256-bit registers by default even where AVX-512 is there; the bf16
    # element-wise loops run about 1.5x faster with 512 (on CPUs without AVX-512 it is a no-op).
    _SOURCES["fused_ops.c"].append("-mprefer-vector-width=512")
DTYPE_CODES = {torch.bfloat16: 0, torch.float32: 1}


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler_version(compiler: str) -> str:
    result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    return result.stdout


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr.strip()}")


def _build(compiler: str, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Build in a scratch folder beside the target and rename, so concurrent processes never load a
    # half-written file.
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as scratch:
        objects = []
        for name, flags in _SOURCES.items():
            objects.append(os.path.join(scratch, name.replace(".c", ".o")))
            _run([compiler, *_FLAGS, *flags, "-c", os.path.join(_CSRC, name), "-o", objects[-1]])
        library = os.path.join(scratch, "kernels.so")
        _run([compiler, *_FLAGS, "-shared", *objects, "-o", library, "-lm"])
        os.replace(library, path)


def load_cpu_kernels() -> Optional[CpuKernels]:
    """The compiled kernels, or None when they cannot be built here or SPLITFUSE_DISABLE_CPU_KERNELS is set."""
    if os.environ.get("SPLITFUSE_DISABLE_CPU_KERNELS"):
        return None
    return _build_and_load()


@functools.lru_cache(maxsize=None)
def _build_and_load() -> Optional[CpuKernels]:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found; CPU attention falls back to torch ops (slower)")
        return None
    try:
        parts = [repr((_FLAGS, _SOURCES)).encode(), _compiler_version(compiler).encode(), _cpu_id().encode()]
        for name in sorted(os.listdir(_CSRC)):  # the sources and the headers they include
            with open(os.path.join(_CSRC, name), "rb") as f:
                parts.append(f.read())
        key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
        path = os.path.join(default_cache_root(), "kernels", f"cpu-kernels-{key}.so")
        if not os.path.exists(path):
            logger.info("building the CPU kernels into %s", path)
            _build(compiler, path)
        library = ctypes.CDLL(path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning("could not build the CPU kernels; falling back to torch ops: %s", error)
        return None
    return CpuKernels(library)


_I32, _I64, _PTR, _F32 = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_SIGNATURES = {  # name -> argument types (every function returns void or int)
    "paged_attention": [_I32, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _I32, _I32, _I32, _I32, _I32,
                        _F32, _I32, _I64],
    "rms_norm": [_I32, _PTR, _PTR, _PTR, _PTR, _I64, _I32, _I64, _F32],
    "rotary_embedding": [_I32, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I32, _I32, _I32, _I64, _I64],
    "silu_and_mul": [_I32, _PTR, _PTR, _I64, _I32],
    "write_kv_cache": [_I32, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I32, _I64, _I64],
    "argmax_rows": [_I32, _PTR, _PTR, _I64, _I64, _I64],
    "amx_linear": [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64],
    "amx_linear_silu_mul": [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64],
    "amx_pack_weight": [_PTR, _PTR, _I64, _I64],
    "amx_linear_available": [],
    "decoder_layers": [_PTR, _I32, _PTR, _PTR, _PTR],
    "paged_attention_max_rows": [],
    "paged_attention_max_head_dim": [],
    "paged_attention_max_block_size": [],
}


def amx_packed_columns(out_features: int) -> int:
    """Columns of an AMX-packed weight (csrc/amx_linear.c): out_features padded with zeros to a multiple of 32."""
    return -(-out_features // 32) * 32


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: on the CPU, all bf16 or all fp32, rows of unit stride."""
    dtype = tensors[0].dtype
    if dtype not in DTYPE_CODES:
        return False
    for tensor in tensors:  # a plain loop: this runs a few dozen times per step
        if tensor.device.type != "cpu" or tensor.dtype != dtype or tensor.stride(-1) != 1:
            return False
    return True


class CpuKernels:
    """Tensor-level wrappers; callers check ``applies`` first (dtype, device, unit stride)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        for name, argtypes in _SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes = argtypes
            function.restype = _I32 if name.startswith(("paged_attention_max", "amx_linear_available")) else None
        self.library = library
        # AMX needs the CPU (the build has it only with -march=native on an AMX CPU) and Linux's permission.
        self.has_amx = bool(library.amx_linear_available()) and not os.environ.get("SPLITFUSE_DISABLE_AMX")

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [T, hidden] (rows may be strided); residual, when given, is updated in place to x + residual."""
        out = torch.empty(x.shape, dtype=x.dtype)
        self.library.rms_norm(DTYPE_CODES[x.dtype], out.data_ptr(), None if residual is None else residual.data_ptr(),
                              x.data_ptr(), weight.data_ptr(), x.shape[0], x.shape[1], x.stride(0), eps)
        return out

    def rotary_embedding(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor) -> None:
        """In place: query [T, H, D], key [T, KVH, D] (each head's D contiguous; rows may be strided)."""
        self.library.rotary_embedding(DTYPE_CODES[query.dtype], query.data_ptr(), key.data_ptr(),
                                      positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), query.shape[0],
                                      query.shape[1], key.shape[1], query.shape[2], query.stride(0), key.stride(0))

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [T, 2I] contiguous -> silu(gate) * up [T, I]."""
        out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype)
        self.library.silu_and_mul(DTYPE_CODES[gate_up.dtype], out.data_ptr(), gate_up.data_ptr(), gate_up.shape[0],
                                  gate_up.shape[1] // 2)
        return out

    def write_kv_cache(self, key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """key_cache[slot_mapping[t]] = key[t] (and value); key/value [T, KVH, D] with strided rows."""
        if not key.shape[0] == value.shape[0] == slot_mapping.shape[0]:  # the C loop trusts these
            raise ValueError(f"{key.shape[0]} key and {value.shape[0]} value rows for {slot_mapping.shape[0]} slots")
        self.library.write_kv_cache(DTYPE_CODES[key.dtype], key_cache.data_ptr(), value_cache.data_ptr(),
                                    key.data_ptr(), value.data_ptr(), slot_mapping.data_ptr(), key.shape[0],
                                    key.shape[1] * key.shape[2], key.stride(0), value.stride(0))

    def amx_takes(self, weight: torch.Tensor) -> bool:
        """Whether ``amx_linear`` serves this [out, in] weight: AMX here, bf16 on the CPU, in a multiple of 32."""
        return (self.has_amx and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
                and weight.dim() == 2 and weight.shape[1] % 32 == 0)

    def pack_amx_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """weight [N, K] bf16 -> the tile layout ``amx_linear`` reads (csrc/amx_linear.c), N padded to 32."""
        weight = weight.contiguous()
        packed = torch.empty(amx_packed_columns(weight.shape[0]) * weight.shape[1], dtype=torch.bfloat16)
        self.library.amx_pack_weight(packed.data_ptr(), weight.data_ptr(), *weight.shape)
        return packed

    def amx_linear(self, x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor],
                   out_features: int, silu_mul: bool = False) -> torch.Tensor:
        """x [M, K] bf16 (rows may be strided) @ the packed weight^T + bias (fp32, padded to 32) -> [M, N] bf16.

        With ``silu_mul`` the weight holds gate and up rows in alternating blocks of 16 (``out_features``
        each) and the result is silu(gate) * up [M, out_features], as a gated MLP's first half.
        """
        rows, in_features = x.shape
        # The C loop trusts all of these.
        if x.dtype != torch.bfloat16 or x.stride(1) != 1 or in_features % 32:
            raise ValueError(f"amx_linear takes bf16 rows of unit stride and a multiple of 32 elements, "
                             f"not {x.dtype} {tuple(x.shape)} with strides {x.stride()}")
        columns = 2 * out_features if silu_mul else out_features
        padded = amx_packed_columns(columns)
        if packed.numel() != padded * in_features or (silu_mul and out_features % 16):
            raise ValueError(f"packed weight of {packed.numel()} elements does not fit {columns} x {in_features}"
                             + (" (gate and up in blocks of 16)" if silu_mul else ""))
        if bias is not None and (bias.dtype != torch.float32 or bias.numel() != padded):
            raise ValueError(f"amx_linear wants an fp32 bias of {padded} elements, not {bias.dtype} {bias.numel()}")
        out = torch.empty(rows, out_features, dtype=torch.bfloat16)
        function = self.library.amx_linear_silu_mul if silu_mul else self.library.amx_linear
        function(out.data_ptr(), out_features, x.data_ptr(), x.stride(0), packed.data_ptr(),
                 None if bias is None else bias.data_ptr(), rows, columns, in_features)
        return out

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [rows, vocab] (rows may be strided) -> int64 [rows], the first index of each row's max."""
        out = torch.empty(logits.shape[0], dtype=torch.int64)
        self.library.argmax_rows(DTYPE_CODES[logits.dtype], out.data_ptr(), logits.data_ptr(), logits.shape[0],
                                 logits.shape[1], logits.stride(0))
        return out
