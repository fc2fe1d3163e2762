"""splitfuse: an LLM serving engine — token-budget scheduler, paged KV cache, OpenAI-compatible server."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so `import splitfuse.bench` stays light (no torch, no transformers).
    if name == "LLM":
        from splitfuse.entrypoints.llm import LLM
        return LLM
    if name in ("SamplingParams", "StructuredOutputsParams"):
        from splitfuse import sampling_params
        return getattr(sampling_params, name)
    raise AttributeError(f"module 'splitfuse' has no attribute {name!r}")
