"""dtype "auto" (the default): what it resolves to on this CPU and on one without fast bf16 matmuls."""

from __future__ import annotations

from dataclasses import replace

import torch

from splitfuse.config import EngineConfig
from splitfuse.engine import resolved_config
from splitfuse.engine.resolved_config import cpu_auto_dtype, resolve_config
from splitfuse.models.config import ArchConfig
from splitfuse.platforms.cpu.linear import packing_supported


def resolved_dtype(model: str, dtype: str | None = None) -> torch.dtype:
    kwargs = {} if dtype is None else {"dtype": dtype}
    return resolve_config(EngineConfig.from_kwargs(model=model, **kwargs)).dtype


def test_auto_is_the_default_and_is_bf16_exactly_where_onednn_runs_bf16_natively(llama_ckpt):
    assert EngineConfig.from_kwargs(model=llama_ckpt).model.dtype == "auto"
    native = packing_supported(torch.device("cpu"), torch.bfloat16)
    assert cpu_auto_dtype() == ("bfloat16" if native else "float32")
    assert resolved_dtype(llama_ckpt) == (torch.bfloat16 if native else torch.float32)


def test_without_native_bf16_auto_is_float32_and_a_named_dtype_stays(llama_ckpt, monkeypatch):
    monkeypatch.setattr(resolved_config, "packing_supported", lambda device, dtype: False)
    assert resolved_dtype(llama_ckpt) == torch.float32
    assert resolved_dtype(llama_ckpt, "bfloat16") == torch.bfloat16
    assert resolved_dtype(llama_ckpt, "float16") == torch.float16


def test_off_the_cpu_auto_is_the_checkpoint_half_dtype_else_bf16(llama_ckpt):
    arch = ArchConfig.from_dir(llama_ckpt)
    for checkpoint, expected in [("float16", torch.float16), ("bfloat16", torch.bfloat16),
                                 ("float32", torch.bfloat16), (None, torch.bfloat16)]:
        assert resolved_config._resolve_dtype("auto", replace(arch, checkpoint_dtype=checkpoint)) == expected
