"""The C interface is declared once (platforms/cpu/c_interface.py): the header the C sources compile
against, the ctypes bindings and the ctypes structs all come from it, and the compiler holds the C
definitions to it."""

import ctypes

import pytest
import torch

from splitfuse.platforms import resolve_platform
from splitfuse.platforms.cpu import c_interface, kernels
from splitfuse.platforms.cpu.c_interface import DECODER_LAYER, DECODER_STEP, FUNCTIONS, Param, structure

KERNELS = resolve_platform(torch.device("cpu"), torch.bfloat16).kernels
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="no C compiler for the CPU kernels")


def test_the_header_declares_every_struct_then_every_function_as_c_writes_them():
    header = c_interface.header_text()
    assert "void silu_and_mul(int dtype, void *out, const void *gate_up, int64_t rows, int intermediate);" in header
    assert "int amx_linear_available(void);" in header
    assert "void decoder_layers(const decoder_layer *layers, int num_layers, const decoder_step *s, " \
           "uint16_t *hidden, uint16_t *residual);" in header
    assert "    const int32_t *requests;\n" in header and "} decoder_step;" in header
    assert header.index("} decoder_step;") < header.index("void decoder_layers(")
    assert all(f" {function.name}(" in header for function in FUNCTIONS)


def test_declarations_are_read_as_c_reads_them():
    assert Param.parse("const int64_t *slots") == Param("slots", "const int64_t *")
    assert Param.parse("int64_t  rows") == Param("rows", "int64_t")
    assert Param.parse("uint16_t **tiles").c_declaration() == "uint16_t **tiles"
    assert Param.parse("const float *bias").ctypes_type() is ctypes.c_void_p
    assert Param.parse("float eps").ctypes_type() is ctypes.c_float
    with pytest.raises(ValueError, match="C type 'double' has no ctypes mapping"):
        Param.parse("double eps")


@needs_kernels
def test_every_declared_function_is_in_the_library_with_its_ctypes_signature():
    for function in FUNCTIONS:
        c_function = getattr(KERNELS.library, function.name)
        assert c_function.argtypes == [param.ctypes_type() for param in function.params], function.name
    assert KERNELS.library.paged_attention_max_rows.restype is ctypes.c_int
    assert KERNELS.library.decoder_step_size.restype is ctypes.c_size_t
    assert KERNELS.library.rms_norm.restype is None


@needs_kernels
def test_the_ctypes_structs_have_the_c_structs_size():
    assert ctypes.sizeof(structure(DECODER_LAYER)) == KERNELS.library.decoder_layer_size()
    assert ctypes.sizeof(structure(DECODER_STEP)) == KERNELS.library.decoder_step_size()
    assert [name for name, _ in structure(DECODER_STEP)._fields_][:3] == ["tokens", "hidden", "intermediate"]


@needs_kernels
def test_a_c_definition_that_disagrees_with_the_declaration_does_not_compile(tmp_path):
    # silu_and_mul declared with an int64_t intermediate, as fused_ops.c does not define it.
    wrong = tuple(c_interface.Function(f.name, f.returns, c_interface.parse_params(
        "int dtype, void *out, const void *gate_up, int64_t rows, int64_t intermediate"))
        if f.name == "silu_and_mul" else f for f in FUNCTIONS)
    header = c_interface.header_text(functions=wrong)
    with pytest.raises(RuntimeError, match="conflicting types for .silu_and_mul."):
        kernels.compile_source(kernels.c_compiler(), "fused_ops.c", header, str(tmp_path))
    assert kernels.compile_source(kernels.c_compiler(), "fused_ops.c", c_interface.header_text(), str(tmp_path))


@needs_kernels
def test_the_cache_key_covers_the_generated_header():
    compiler, header = kernels.c_compiler(), c_interface.header_text()
    assert kernels.cache_key(compiler, header) == kernels.cache_key(compiler, header)
    changed = header.replace("int64_t rows", "int rows")
    assert kernels.cache_key(compiler, header) != kernels.cache_key(compiler, changed)
