"""splitfuse: an LLM serving engine — token-budget scheduler, paged KV cache, OpenAI-compatible server."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so `import splitfuse.bench` stays light (no torch, no transformers).
    if name == "LLM":
        from splitfuse.entrypoints.llm import LLM
        return LLM
    if name == "SamplingParams":
        from splitfuse.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'splitfuse' has no attribute {name!r}")
