"""Builds and loads the C kernels in ``csrc/`` for the CPU, once per machine, cached on disk; ``CpuKernels`` wraps them.

The sources are compiled with the machine's C compiler (``cc``, or $CC) and ``-march=native``
into ``<cache root>/kernels/<hash>.so``; the hash covers the sources, the header generated from
``c_interface.py``, the flags, the compiler and the CPU, so a cache shared between machines never
loads code built for another CPU. No compiler or a failed build gives None, and the platform
(``splitfuse/platforms``) runs torch ops instead; whether to use the kernels at all is its call.
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

from splitfuse.cache_root import default_cache_root
from splitfuse.platforms.cpu import c_interface

logger = logging.getLogger(__name__)

_CSRC = os.path.join(os.path.dirname(__file__), "csrc")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c11"]
# source -> its own flags. fast-math lets the element-wise loops (exp included) vectorize; the
# attention kernel relies on -inf comparisons, which fast-math may drop, so it gets none.
_SOURCES = {"paged_attention.c": ["-fno-math-errno"], "fused_ops.c": ["-ffast-math"], "amx_linear.c": [],
            "decoder.c": []}
if platform.machine() in ("x86_64", "AMD64"):
    # gcc vectorizes with 256-bit registers by default even where AVX-512 is there; the bf16
    # element-wise loops run faster with 512 (on CPUs without AVX-512 it is a no-op).
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


def compile_source(compiler: str, name: str, header: str, scratch: str) -> str:
    """Compiles ``csrc/<name>`` against ``header`` (written into ``scratch``); returns the object's path."""
    with open(os.path.join(scratch, c_interface.HEADER_NAME), "w") as f:
        f.write(header)
    target = os.path.join(scratch, name.replace(".c", ".o"))
    _run([compiler, *_FLAGS, *_SOURCES[name], "-I", scratch, "-c", os.path.join(_CSRC, name), "-o", target])
    return target


def _build(compiler: str, header: str, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Build in a scratch folder beside the target and rename, so concurrent processes never load a
    # half-written file.
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as scratch:
        objects = [compile_source(compiler, name, header, scratch) for name in _SOURCES]
        library = os.path.join(scratch, "kernels.so")
        _run([compiler, *_FLAGS, "-shared", *objects, "-o", library, "-lm"])
        os.replace(library, path)


def cache_key(compiler: str, header: str) -> str:
    """What the built library depends on: flags, compiler, CPU, the generated header, every file in csrc/."""
    parts = [repr((_FLAGS, _SOURCES)).encode(), _compiler_version(compiler).encode(), _cpu_id().encode(),
             header.encode()]
    for name in sorted(os.listdir(_CSRC)):  # the sources and the headers they include
        with open(os.path.join(_CSRC, name), "rb") as f:
            parts.append(f.read())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def c_compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@functools.lru_cache(maxsize=None)
def build_cpu_kernels() -> Optional[CpuKernels]:
    """The compiled kernels (built on the first call in a process, loaded from the cache after), or None."""
    compiler = c_compiler()
    if compiler is None:
        logger.warning("no C compiler found; the CPU runs torch ops instead of the C kernels (slower)")
        return None
    header = c_interface.header_text()
    try:
        path = os.path.join(default_cache_root(), "kernels", f"cpu-kernels-{cache_key(compiler, header)}.so")
        if not os.path.exists(path):
            logger.info("building the CPU kernels into %s", path)
            _build(compiler, header, path)
        library = ctypes.CDLL(path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning("could not build the CPU kernels; falling back to torch ops: %s", error)
        return None
    return CpuKernels(library)


def amx_packed_columns(out_features: int) -> int:
    """Columns of an AMX-packed weight (csrc/amx_linear.c): out_features padded with zeros to a multiple of 32."""
    return -(-out_features // 32) * 32


class CpuKernels:
    """Tensor-level wrappers: CPU tensors, all bf16 or all fp32 (``DTYPE_CODES``), each row of unit stride.

    The platform hands them only such tensors (it chose them for the model's dtype and layout);
    the checks left here guard sizes a C loop trusts.
    """

    def __init__(self, library: ctypes.CDLL) -> None:
        c_interface.bind(library)
        self.library = library
        # AMX needs the CPU (the build has it only with -march=native on an AMX CPU) and Linux's permission.
        self.amx_available = bool(library.amx_linear_available())

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
        """Whether ``amx_linear`` serves this [out, in] weight: bf16 on the CPU, its input size a multiple of 32."""
        return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.dim() == 2
                and weight.shape[1] % 32 == 0)

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
