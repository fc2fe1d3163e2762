"""The built-in demo checkpoint: a small random bf16 Llama, generated locally on first use and cached."""

from __future__ import annotations

import logging
import os
import time
import types

import torch
import transformers

from splitfuse.cache_root import default_cache_root
from splitfuse.checkpoint_dirs import build_once
from splitfuse.checkpoint_factory import train_tokenizer, write_checkpoint

logger = logging.getLogger(__name__)

# Bump the suffix whenever anything below (or the tokenizer corpus) changes: old caches then stay valid
# for old code instead of silently serving different weights under the same name.
DEMO_CHECKPOINT_NAME = "demo-llama-v1"
DEMO_SEED = 0
DEMO_DTYPE = torch.bfloat16
# LlamaConfig kwargs, read-only so nobody edits the demo's shape at run time. ~58M parameters (~116 MB).
DEMO_MODEL_CONFIG = types.MappingProxyType({
    "vocab_size": 32000,
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "intermediate_size": 1536,
    "max_position_embeddings": 2048,
})


def demo_hf_config() -> transformers.LlamaConfig:
    """A fresh LlamaConfig of the demo model (callers may mutate their copy)."""
    return transformers.LlamaConfig(**DEMO_MODEL_CONFIG)


def demo_model_path(cache_dir: str | None = None) -> str:
    """Returns `<cache root>/demo-llama-v1`, generating the checkpoint there on first use.

    Cache root: `cache_dir`, else $SPLITFUSE_CACHE, else ~/.cache/splitfuse. Generation is deterministic
    (same bytes every time, a few seconds on CPU); concurrent callers may both generate, one rename wins
    and both return the same finished folder."""
    path = os.path.join(os.path.abspath(cache_dir or default_cache_root()), DEMO_CHECKPOINT_NAME)
    start_s = time.perf_counter()

    def generate() -> None:
        tokenizer = train_tokenizer(DEMO_MODEL_CONFIG["vocab_size"], seed=DEMO_SEED)
        write_checkpoint(demo_hf_config(), path, tokenizer=tokenizer, seed=DEMO_SEED, dtype=DEMO_DTYPE)

    if build_once(path, generate):
        logger.info("generated demo checkpoint at %s in %.1f s", path, time.perf_counter() - start_s)
    return path
