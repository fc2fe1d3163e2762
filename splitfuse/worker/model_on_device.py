"""ModelOnDevice: a checkpoint's model on its platform, with a KV pool of its own — what the target model
(``model_runner.py``) and a draft model (``draft_model.py``) are each built as."""

from __future__ import annotations

from dataclasses import dataclass

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
    pool_shape: tuple  # KVStore's arguments after num_blocks: layers, block size, KV heads, head dim, dtype, device

    @classmethod
    def load(cls, model_path: str, arch: ArchConfig, *, dtype: torch.dtype, device: torch.device, num_blocks: int,
             block_size: int, attention_backend: str, batch_invariant: bool) -> "ModelOnDevice":
        platform = resolve_platform(device, dtype, attention_backend=attention_backend,
                                    batch_invariant=batch_invariant, arch=arch, block_size=block_size)
        backend = platform.attention_backend
        model = load_model(model_path, arch, platform)
        shape = (arch.num_layers, block_size, arch.num_kv_heads, arch.head_dim, dtype, device)
        kv_store = KVStore(backend, shape[0], num_blocks, *shape[1:])
        windows = tuple(sorted(set(arch.layer_sliding_windows), key=lambda w: (w is not None, w)))
        return cls(platform, backend, model, kv_store, windows, shape)

    def resize_kv_pool(self, num_blocks: int) -> None:
        """A new, empty pool of ``num_blocks`` (after memory profiling ran on a one-block pool)."""
        self.kv_store = None  # the old pool's memory goes back before the new one is taken
        self.kv_store = KVStore(self.backend, self.pool_shape[0], num_blocks, *self.pool_shape[1:])
