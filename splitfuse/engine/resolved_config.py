"""ResolvedConfig: an EngineConfig read against its checkpoint — path, tokenizer, dtype, device, context length, KV pool size."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from splitfuse.attention.backend import kv_cache_bytes_per_block
from splitfuse.config import EngineConfig
from splitfuse.models.config import ArchConfig
from splitfuse.models.sources import resolve_model
from splitfuse.platforms.cpu.linear import packing_supported

logger = logging.getLogger(__name__)

_DEFAULT_MAX_KV_BYTES = 4 << 30
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class ResolvedConfig:
    model_path: str
    tokenizer: PreTrainedTokenizerBase
    arch: ArchConfig
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    num_blocks: Optional[int]  # None: on CUDA, sized by the runner from a profiling step (gpu_memory_utilization)
    eos_token_ids: frozenset[int]
    draft_model_path: Optional[str] = None  # speculative_method="draft": the draft checkpoint, and its arch
    draft_arch: Optional[ArchConfig] = None


def resolve_config(config: EngineConfig) -> ResolvedConfig:
    device = _resolve_device(config.model.device)
    dtype_name = config.model.dtype
    if dtype_name == "auto" and device.type == "cpu":
        dtype_name = cpu_auto_dtype()
    model_path = resolve_model(config.model.model, dtype_name).path
    arch = ArchConfig.from_dir(model_path)
    tokenizer = load_tokenizer(config.model.tokenizer or model_path)
    dtype = _resolve_dtype(dtype_name, arch)
    max_model_len = arch.max_position_embeddings
    if config.model.max_model_len is not None:
        if config.model.max_model_len > arch.max_position_embeddings:
            raise ValueError(f"max_model_len {config.model.max_model_len} exceeds the model's "
                             f"max_position_embeddings {arch.max_position_embeddings}")
        max_model_len = config.model.max_model_len
    num_blocks = _num_blocks(config, arch, dtype, max_model_len, device)
    draft_model_path = draft_arch = None
    if config.scheduler.speculative_model is not None:
        draft_model_path = resolve_model(config.scheduler.speculative_model, dtype_name).path
        draft_arch = ArchConfig.from_dir(draft_model_path)
        if draft_arch.vocab_size != arch.vocab_size:
            raise ValueError(f"the draft model {config.scheduler.speculative_model!r} has a vocabulary of "
                             f"{draft_arch.vocab_size} tokens, the target {arch.vocab_size}: a draft model must "
                             "share the target's tokenizer")
    return ResolvedConfig(model_path, tokenizer, arch, dtype, device, max_model_len, num_blocks,
                          _eos_token_ids(model_path, arch, tokenizer), draft_model_path, draft_arch)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a tokenizer from {path!r}: {error}") from error


def cpu_auto_dtype() -> str:
    """What dtype "auto" means on this CPU: bfloat16 where oneDNN runs bf16 matmuls natively (AVX-512 /
    AMX: packed bf16 weights), else float32 — on AVX2-only CPUs torch's bf16 matmul is emulated, ~30x
    slower than fp32 (docs/benchmarks.md, "dtype auto")."""
    return "bfloat16" if packing_supported(torch.device("cpu"), torch.bfloat16) else "float32"


def _resolve_dtype(name: str, arch: ArchConfig) -> torch.dtype:
    """``name`` is concrete, or "auto" off the CPU: the checkpoint's half dtype, else bfloat16."""
    if name == "auto":
        name = arch.checkpoint_dtype if arch.checkpoint_dtype in ("bfloat16", "float16") else "bfloat16"
    return _DTYPES[name]


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but CUDA is not available")
    return torch.device(name)


def _num_blocks(config: EngineConfig, arch: ArchConfig, dtype: torch.dtype, max_model_len: int,
                device: torch.device) -> Optional[int]:
    """The pool size: exact override, else --kv-cache-memory, else on CUDA None (the runner profiles), else
    enough for max_num_seqs full requests (<= 4 GiB)."""
    cache = config.cache
    if cache.num_gpu_blocks_override is not None:
        return cache.num_gpu_blocks_override
    if cache.kv_cache_memory is None and device.type == "cuda":
        return None
    bytes_per_block = kv_cache_bytes_per_block(arch.num_layers, cache.block_size, arch.num_kv_heads,
                                               arch.head_dim, dtype)
    if cache.kv_cache_memory is not None:
        num_blocks = cache.kv_cache_memory // bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory of {cache.kv_cache_memory} bytes is smaller than one KV block "
                             f"({bytes_per_block} bytes)")
        return num_blocks
    blocks_per_request = -(-max_model_len // cache.block_size)
    wanted = blocks_per_request * config.scheduler.max_num_seqs
    return max(1, min(wanted, _DEFAULT_MAX_KV_BYTES // bytes_per_block))


def _eos_token_ids(model_path: str, arch: ArchConfig, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer, together."""
    ids = set(arch.eos_token_ids)
    generation_config = os.path.join(model_path, "generation_config.json")
    if os.path.isfile(generation_config):
        with open(generation_config) as f:
            eos = json.load(f).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
