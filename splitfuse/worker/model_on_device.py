"""ModelOnDevice: a checkpoint's model on its platform, with a KV pool of its own — what the target model
(``model_runner.py``) and a draft model (``draft_model.py``) are each built as."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from splitfuse.attention.backend import AttentionBackend
from splitfuse.models.config import ArchConfig
from splitfuse.models.loader import load_model
from splitfuse.platforms import Platform, resolve_platform
from splitfuse.worker.kv_store import KVStore


@dataclass
class ModelOnDevice:
    platform: Platform
    backend: AttentionBackend
    model: nn.Module
    kv_store: KVStore
    sliding_windows: tuple  # the distinct sliding windows of its layers (None: full attention), None first
    new_pool: Callable[[int], KVStore]  # num_blocks -> an empty pool of this model's layout

    @classmethod
    def load(cls, model_path: str, arch: ArchConfig, *, dtype: torch.dtype, device: torch.device, num_blocks: int,
             block_size: int, attention_backend: str, batch_invariant: bool) -> "ModelOnDevice":
        platform = resolve_platform(device, dtype, attention_backend=attention_backend,
                                    batch_invariant=batch_invariant, arch=arch, block_size=block_size)
        backend = platform.attention_backend
        model = load_model(model_path, arch, platform)
        new_pool = functools.partial(KVStore, backend, arch.num_layers, block_size=block_size,
                                     num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim, dtype=dtype, device=device)
        windows = tuple(sorted(set(arch.layer_sliding_windows), key=lambda w: (w is not None, w)))
        return cls(platform, backend, model, new_pool(num_blocks), windows, new_pool)

    def resize_kv_pool(self, num_blocks: int) -> None:
        """A new, empty pool of ``num_blocks`` (after memory profiling ran on a one-block pool)."""
        self.kv_store = None  # the old pool's memory goes back before the new one is taken
        self.kv_store = self.new_pool(num_blocks)
