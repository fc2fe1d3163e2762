"""resolve_platform decides once what runs a model: the attention backend, the layers' ops, linear packing."""

import types

import pytest
import torch

from splitfuse.attention.torch_native import TorchNativeBackend
from splitfuse.platforms import cuda, resolve_platform
from splitfuse.platforms.cpu.attention import CpuPagedBackend
from splitfuse.platforms.cpu.kernels import CpuKernels
from splitfuse.platforms.cpu.linear import packing_supported
from splitfuse.platforms.ops import TORCH_OPS

CPU = torch.device("cpu")
KERNELS = resolve_platform(CPU, torch.bfloat16).kernels
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="no C compiler for the CPU kernels")


def shape(head_dim=64, num_heads=8, num_kv_heads=4):
    return types.SimpleNamespace(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)


def kernel_calls(platform, monkeypatch) -> list[str]:
    """The CpuKernels methods the platform's four ops call, one call of each."""
    calls = []
    for name in ("rms_norm", "rotary_embedding", "silu_and_mul", "argmax"):
        original = getattr(CpuKernels, name)
        monkeypatch.setattr(CpuKernels, name, lambda self, *args, _name=name, _original=original:
                            calls.append(_name) or _original(self, *args))
    dtype = platform.dtype
    x, weight = torch.randn(3, 64).to(dtype), torch.ones(64, dtype=dtype)
    platform.ops.rms_norm(x, weight, 1e-6, None)
    qkv = torch.randn(3, 3, 2, 16).to(dtype)
    cos = sin = torch.ones(8, 8)
    platform.ops.rotary(torch.tensor([0, 1, 2]), qkv[:, 0], qkv[:, 1], cos, sin)
    platform.ops.silu_and_mul(torch.randn(3, 64).to(dtype))
    platform.ops.argmax(x)
    return calls


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_in_bf16_or_fp32_runs_the_c_kernels(dtype, monkeypatch):
    monkeypatch.delenv("SPLITFUSE_DISABLE_AMX", raising=False)
    platform = resolve_platform(CPU, dtype, arch=shape(), block_size=16, batch_invariant=True)
    assert type(platform.attention_backend) is CpuPagedBackend and platform.attention_backend.batch_invariant
    assert platform.kernels is KERNELS
    assert kernel_calls(platform, monkeypatch) == ["rms_norm", "rotary_embedding", "silu_and_mul", "argmax"]
    # Linear layers are packed in bf16 only; fp32 keeps nn.Linear (and exact parity).
    assert (platform.linears is not None) == (dtype == torch.bfloat16 and packing_supported(CPU, dtype))
    if platform.linears is not None:
        assert platform.linears.row_tile == 32 and platform.uses_amx == KERNELS.amx_available


def test_fp16_on_the_cpu_runs_torch_ops_and_torch_attention():
    platform = resolve_platform(CPU, torch.float16)
    assert (platform.kernels, platform.linears, platform.ops) == (None, None, TORCH_OPS)
    assert type(platform.attention_backend) is TorchNativeBackend and not platform.uses_amx


needs_triton = pytest.mark.skipif(not cuda.triton_available(), reason="triton is not installed")


@needs_triton
def test_other_devices_take_the_cuda_path_with_triton_where_it_imports():
    from splitfuse.platforms.cuda.triton_attention import TritonAttentionBackend
    from splitfuse.platforms.cuda.triton_ops import TRITON_OPS

    platform = resolve_platform(torch.device("cuda"), torch.bfloat16)  # decided without touching the device
    assert (platform.kernels, platform.linears, platform.ops) == (None, None, TRITON_OPS)
    if not cuda.flashinfer_available():
        assert type(platform.attention_backend) is TritonAttentionBackend
    named = resolve_platform(torch.device("cuda"), torch.bfloat16, attention_backend="triton")
    assert type(named.attention_backend) is TritonAttentionBackend and named.attention_backend.graph_safe


def test_the_cuda_path_keeps_torch_when_triton_is_switched_off(monkeypatch):
    monkeypatch.setenv("SPLITFUSE_DISABLE_TRITON", "1")
    platform = resolve_platform(torch.device("cuda"), torch.bfloat16)
    assert (platform.kernels, platform.linears, platform.ops) == (None, None, TORCH_OPS)
    if not cuda.flashinfer_available():
        assert type(platform.attention_backend) is TorchNativeBackend
    assert platform.attention_backend.device == torch.device("cuda")
    with pytest.raises(ValueError, match=r"^attention backend 'triton' needs the triton package \(pip install "
                                         r"triton\) and SPLITFUSE_DISABLE_TRITON unset$"):
        resolve_platform(torch.device("cuda"), torch.bfloat16, attention_backend="triton")


@pytest.mark.skipif(cuda.flashinfer_available(), reason="flashinfer is installed")
def test_asking_for_flashinfer_without_it_says_how_to_install_it():
    with pytest.raises(ValueError, match=r"^attention backend 'flashinfer' needs the flashinfer package "
                                         r"\(pip install flashinfer-python\) and a CUDA device$"):
        resolve_platform(torch.device("cuda"), torch.bfloat16, attention_backend="flashinfer")


def test_the_gpu_backends_are_refused_on_the_cpu():
    for name in ("triton", "flashinfer"):
        with pytest.raises(ValueError, match=rf"^attention backend '{name}' runs on CUDA only \(this model is on "
                                             r"the CPU\)$"):
            resolve_platform(CPU, torch.float32, attention_backend=name)


@needs_kernels
def test_torch_attention_when_asked_with_the_c_ops_kept(monkeypatch):
    platform = resolve_platform(CPU, torch.bfloat16, attention_backend="torch")
    assert type(platform.attention_backend) is TorchNativeBackend and platform.kernels is KERNELS
    assert len(kernel_calls(platform, monkeypatch)) == 4


@needs_kernels
def test_a_shape_past_the_attention_kernels_limits_gets_torch_attention_under_auto():
    for arch, block_size in [(shape(head_dim=512), 16), (shape(num_heads=64, num_kv_heads=1), 16), (shape(), 128)]:
        platform = resolve_platform(CPU, torch.float32, arch=arch, block_size=block_size)
        assert type(platform.attention_backend) is TorchNativeBackend
        assert platform.kernels is KERNELS  # the other ops still run on the kernels


def test_asking_for_the_cpu_kernel_where_it_cannot_run_is_an_error():
    message = (r"attention backend 'cpu-kernel' cannot serve this model here: it needs the CPU, bfloat16 or float32 "
               r"\(got {}, {}\), a working C compiler, and head_dim <= 256, block_size <= 64")
    with pytest.raises(ValueError, match=message.format("cpu", "float16")):
        resolve_platform(CPU, torch.float16, attention_backend="cpu-kernel")
    with pytest.raises(ValueError, match=message.format("cuda", "bfloat16")):
        resolve_platform(torch.device("cuda"), torch.bfloat16, attention_backend="cpu-kernel")


@needs_kernels
def test_the_environment_switches_are_read_when_the_platform_is_resolved(monkeypatch):
    monkeypatch.delenv("SPLITFUSE_DISABLE_AMX", raising=False)
    platform = resolve_platform(CPU, torch.bfloat16)
    monkeypatch.setenv("SPLITFUSE_DISABLE_AMX", "1")
    without_amx = resolve_platform(CPU, torch.bfloat16)
    assert without_amx.kernels is KERNELS and not without_amx.uses_amx
    assert without_amx.fused_decoder(torch.nn.Module()) is None
    monkeypatch.setenv("SPLITFUSE_DISABLE_CPU_KERNELS", "1")
    without_kernels = resolve_platform(CPU, torch.bfloat16)
    assert without_kernels.kernels is None and without_kernels.ops is TORCH_OPS
    assert type(without_kernels.attention_backend) is TorchNativeBackend
    # A platform resolved before keeps what it chose.
    assert platform.kernels is KERNELS and platform.uses_amx == KERNELS.amx_available
    assert len(kernel_calls(platform, monkeypatch)) == 4
