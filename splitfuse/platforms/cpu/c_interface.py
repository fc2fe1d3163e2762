"""The C kernels' interface, declared once: the C header every ``csrc/*.c`` file includes and the ctypes bindings.

Each exported function and the two structs ``decoder_layers`` reads are declared here with their C types,
written as C writes them. From that one declaration:

- ``header_text()`` is the C header the build writes beside the sources' objects; every ``.c`` file
  includes it, so the compiler checks each definition against it (a mismatch is "conflicting types");
- ``bind(library)`` sets each function's ``argtypes`` and ``restype`` on the loaded library;
- ``structure(DECODER_STEP)`` is the ctypes ``Structure`` with the C struct's fields in its order.

Pointers cross as addresses (``tensor.data_ptr()``, a numpy array's ``ctypes.data``, or None for NULL).
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from typing import Any, Optional

HEADER_NAME = "splitfuse_kernels.h"

# C scalar types -> how ctypes passes them. Every pointer, whatever it points at, passes as c_void_p.
_SCALARS: dict[str, Any] = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "size_t": ctypes.c_size_t,
                            "float": ctypes.c_float}
_RETURNS: dict[str, Optional[Any]] = {"void": None, "int": ctypes.c_int, "size_t": ctypes.c_size_t}


@dataclass(frozen=True)
class Param:
    """One parameter or struct field: "const int64_t *slots" -> name "slots", c_type "const int64_t *"."""

    name: str
    c_type: str

    @classmethod
    def parse(cls, declaration: str) -> Param:
        match = re.fullmatch(r"\s*(.*?[\s*])(\w+)\s*", declaration)
        if match is None:
            raise ValueError(f"cannot read the C declaration {declaration!r}")
        c_type = " ".join(match.group(1).replace("*", " * ").split()).replace("* *", "**")
        param = cls(match.group(2), c_type)
        param.ctypes_type()  # an unknown scalar type is refused here, not at the first call
        return param

    def ctypes_type(self) -> Any:
        if self.c_type.endswith("*"):
            return ctypes.c_void_p
        if self.c_type not in _SCALARS:
            raise ValueError(f"{self.name}: C type {self.c_type!r} has no ctypes mapping "
                             f"(known: {', '.join(_SCALARS)})")
        return _SCALARS[self.c_type]

    def c_declaration(self) -> str:
        return f"{self.c_type}{self.name}" if self.c_type.endswith("*") else f"{self.c_type} {self.name}"


def parse_params(declarations: str) -> tuple[Param, ...]:
    return tuple(Param.parse(part) for part in declarations.split(",")) if declarations.strip() else ()


@dataclass(frozen=True)
class Function:
    name: str
    returns: str  # "void", "int" or "size_t"
    params: tuple[Param, ...]

    def c_prototype(self) -> str:
        params = ", ".join(param.c_declaration() for param in self.params) or "void"
        return f"{self.returns} {self.name}({params});"


@dataclass(frozen=True)
class Struct:
    name: str
    doc: str
    fields: tuple[Param, ...]

    def c_typedef(self) -> list[str]:
        return [f"/* {self.doc} */", "typedef struct {", *(f"    {field.c_declaration()};" for field in self.fields),
                f"}} {self.name};"]


def _function(returns: str, name: str, params: str = "") -> Function:
    if returns not in _RETURNS:
        raise ValueError(f"{name}: return type {returns!r} is not one of {', '.join(_RETURNS)}")
    return Function(name, returns, parse_params(params))


DECODER_LAYER = Struct("decoder_layer", "One layer's weights (AMX-packed; biases fp32 padded to 32, or NULL), its KV "
                       "cache and its sliding window (0: none).", parse_params(
                           "const uint16_t *input_norm, const uint16_t *post_norm, const uint16_t *qkv, "
                           "const uint16_t *o, const uint16_t *gate_up, const uint16_t *down, "
                           "const float *qkv_bias, const float *o_bias, const float *gate_up_bias, "
                           "const float *down_bias, uint16_t *key_cache, uint16_t *value_cache, int64_t window"))

DECODER_STEP = Struct("decoder_step", "The step: sizes, attention metadata and scratch buffers (bf16, [tokens, width] "
                      "each).", parse_params(
                          "int64_t tokens, int64_t hidden, int64_t intermediate, int64_t num_heads, "
                          "int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float eps, float scale, "
                          "const int64_t *positions, const float *cos, const float *sin, const int64_t *slot_mapping, "
                          "const int64_t *block_tables, int64_t block_table_stride, const int64_t *query_start_loc, "
                          "const int64_t *context_lens, const int32_t *requests, int64_t num_requests, "
                          "uint16_t *normed, uint16_t *qkv, uint16_t *attention, uint16_t *activation"))

STRUCTS = (DECODER_LAYER, DECODER_STEP)

# dtype arguments: 0 bf16, 1 fp32 (kernels.DTYPE_CODES).
FUNCTIONS = (
    _function("void", "paged_attention",
              "int dtype, void *out, const void *query, const void *key_cache, const void *value_cache, "
              "const int64_t *block_tables, int64_t block_table_stride, const int64_t *query_start_loc, "
              "const int64_t *context_lens, const int32_t *requests, int num_requests, int num_heads, "
              "int num_kv_heads, int head_dim, int block_size, float scale, int window, int64_t query_stride"),
    _function("int", "paged_attention_max_rows"),
    _function("int", "paged_attention_max_head_dim"),
    _function("int", "paged_attention_max_block_size"),
    _function("void", "rms_norm", "int dtype, void *out, void *residual, const void *x, const void *weight, "
                                  "int64_t rows, int hidden, int64_t x_stride, float eps"),
    _function("void", "rotary_embedding",
              "int dtype, void *query, void *key, const int64_t *positions, const float *cos_cache, "
              "const float *sin_cache, int64_t tokens, int num_heads, int num_kv_heads, int head_dim, "
              "int64_t q_stride, int64_t k_stride"),
    _function("void", "silu_and_mul", "int dtype, void *out, const void *gate_up, int64_t rows, int intermediate"),
    _function("void", "write_kv_cache",
              "int dtype, void *key_cache, void *value_cache, const void *key, const void *value, "
              "const int64_t *slots, int64_t tokens, int row_size, int64_t key_stride, int64_t value_stride"),
    _function("void", "argmax_rows", "int dtype, int64_t *out, const void *logits, int64_t rows, int64_t cols, "
                                     "int64_t stride"),
    _function("int", "amx_linear_available"),
    _function("void", "amx_pack_weight", "uint16_t *packed, const uint16_t *weight, int64_t n, int64_t k"),
    _function("void", "amx_linear", "uint16_t *y, int64_t y_stride, const uint16_t *x, int64_t x_stride, "
                                    "const uint16_t *packed, const float *bias, int64_t m, int64_t n, int64_t k"),
    _function("void", "amx_linear_silu_mul",
              "uint16_t *y, int64_t y_stride, const uint16_t *x, int64_t x_stride, const uint16_t *packed, "
              "const float *bias, int64_t m, int64_t n, int64_t k"),
    _function("void", "decoder_layers", "const decoder_layer *layers, int num_layers, const decoder_step *s, "
                                        "uint16_t *hidden, uint16_t *residual"),
    # sizeof of the two structs as C lays them out, for the test that checks ctypes lays them out alike.
    _function("size_t", "decoder_layer_size"),
    _function("size_t", "decoder_step_size"),
)


def header_text(functions: tuple[Function, ...] = FUNCTIONS, structs: tuple[Struct, ...] = STRUCTS) -> str:
    """The C header: the struct typedefs, then every function's prototype."""
    lines = ["/* Generated from splitfuse/platforms/cpu/c_interface.py when the kernels are built: edit that "
             "file, not this one. */", "#ifndef SPLITFUSE_KERNELS_H", "#define SPLITFUSE_KERNELS_H", "",
             "#include <stddef.h>", "#include <stdint.h>", ""]
    for struct in structs:
        lines += [*struct.c_typedef(), ""]
    lines += [function.c_prototype() for function in functions]
    lines += ["", "#endif", ""]
    return "\n".join(lines)


def bind(library: ctypes.CDLL) -> None:
    """Sets every declared function's argument and return types (a function the library lacks raises AttributeError)."""
    for function in FUNCTIONS:
        c_function = getattr(library, function.name)
        c_function.argtypes = [param.ctypes_type() for param in function.params]
        c_function.restype = _RETURNS[function.returns]


def structure(struct: Struct) -> type[ctypes.Structure]:
    """A ctypes Structure with the struct's fields, in its order and with its types."""
    return type(struct.name, (ctypes.Structure,),
                {"_fields_": [(field.name, field.ctypes_type()) for field in struct.fields]})
