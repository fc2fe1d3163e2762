"""Where splitfuse keeps what it builds once (C kernels, converted GGUF files, the demo checkpoint)."""

from __future__ import annotations

import os


def default_cache_root() -> str:
    """$SPLITFUSE_CACHE, else ~/.cache/splitfuse."""
    return os.environ.get("SPLITFUSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "splitfuse")
