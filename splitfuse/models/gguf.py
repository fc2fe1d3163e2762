"""Reads GGUF checkpoints (llama.cpp's format) and writes them out as Hugging Face checkpoint directories.

A GGUF file holds the architecture in its metadata (`llama.block_count`, ...), the tokenizer and chat
template (`tokenizer.ggml.*`, `tokenizer.chat_template`) and the weights, often quantized in blocks.
`convert_gguf` turns one into a directory that our loader, transformers and vLLM all read as it is:
config.json, safetensors dequantized to one dtype, the tokenizer files and generation_config.json.

Two facts of llama.cpp's converter shape the code:

- Tensor shapes are stored fastest-dimension first (`[in, out]` for a linear weight); the data, once
  dequantized, is the row-major `[out, in]` matrix.
- For the `llama` architecture (which covers Mistral too) the converter permutes the rows of the q and k
  projections, from HF's rotate-half RoPE layout (first half of each head, then the second half) to the
  interleaved pairs llama.cpp's kernel rotates. `_unpermute_rows` undoes it. Qwen2/Qwen3 use the NeoX
  (rotate-half) layout in llama.cpp too, so their rows are stored as HF has them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import numpy as np
import torch

from splitfuse.checkpoint_dirs import atomic_directory

# GGUF general.architecture -> (HF architecture, HF model_type)
GGUF_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
# Architectures whose q/k rows llama.cpp's converter permutes.
_PERMUTED_QK = frozenset({"llama"})

# Tensor types we dequantize (gguf's numpy dequantizers, ports of llama.cpp's).
SUPPORTED_TENSOR_TYPES = frozenset({
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
})

# blk.N.<gguf name> -> model.layers.N.<HF name>
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_SHARD_BYTES = 2 << 30


class GGUFError(ValueError):
    """A GGUF file we cannot serve: names the architecture, tensor type or key that is the problem."""


def is_gguf_file(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


class GGUFCheckpoint:
    """One GGUF file, read lazily: the tensors are memory-mapped, dequantized one at a time."""

    def __init__(self, path: str) -> None:
        import gguf  # imported here: only GGUF users pay for it

        if not is_gguf_file(path):
            raise GGUFError(f"{path!r} is not a GGUF file (no GGUF magic)")
        self.path = os.path.abspath(path)
        self._reader = gguf.GGUFReader(self.path)
        self.architecture = self._value("general.architecture")
        if self.architecture not in GGUF_ARCHITECTURES:
            raise GGUFError(f"unsupported GGUF architecture {self.architecture!r}; "
                            f"supported: {', '.join(sorted(GGUF_ARCHITECTURES))}")
        self.tensor_names = [t.name for t in self._reader.tensors]
        self.hf_config = self._hf_config_dict()

    def _value(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def _arch_value(self, key: str, default: Any = None) -> Any:
        return self._value(f"{self.architecture}.{key}", default)

    def _hf_config_dict(self) -> dict[str, Any]:
        """config.json's contents for this file (the HF names; transformers fills in the rest)."""
        architecture, model_type = GGUF_ARCHITECTURES[self.architecture]
        num_heads = self._required("attention.head_count")
        hidden_size = self._required("embedding_length")
        head_dim = self._arch_value("attention.key_length") or hidden_size // num_heads
        rotary_dim = self._arch_value("rope.dimension_count", head_dim)
        if rotary_dim != head_dim:
            raise GGUFError(f"partial rotary embeddings (rope.dimension_count {rotary_dim} < head_dim "
                            f"{head_dim}) are not supported")
        scaling = self._arch_value("rope.scaling.type", "none")
        if scaling not in ("none", None) or "rope_freqs.weight" in self.tensor_names:
            raise GGUFError(f"RoPE scaling in GGUF files ({scaling!r}, rope_freqs) is not supported")
        if self._arch_value("expert_count", 0):
            raise GGUFError("mixture-of-experts GGUF files are not supported")
        embedding = next(t for t in self._reader.tensors if t.name == "token_embd.weight")
        config: dict[str, Any] = {
            "architectures": [architecture],
            "model_type": model_type,
            "vocab_size": int(embedding.shape[-1]),
            "hidden_size": hidden_size,
            "intermediate_size": self._required("feed_forward_length"),
            "num_hidden_layers": self._required("block_count"),
            "num_attention_heads": num_heads,
            "num_key_value_heads": self._arch_value("attention.head_count_kv", num_heads),
            "head_dim": head_dim,
            "rms_norm_eps": float(self._required("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self._arch_value("rope.freq_base", 10000.0)),
            "max_position_embeddings": self._required("context_length"),
            "tie_word_embeddings": "output.weight" not in self.tensor_names,
            "bos_token_id": self._value("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._value("tokenizer.ggml.eos_token_id"),
        }
        window = self._arch_value("attention.sliding_window")
        if window and model_type == "llama":
            config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=window)
        if model_type in ("qwen2", "qwen3"):
            config["use_sliding_window"] = False
        return config

    def _required(self, key: str) -> Any:
        value = self._arch_value(key)
        if value is None:
            raise GGUFError(f"GGUF metadata lacks {self.architecture}.{key}")
        return value

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor in `dtype`) for every weight, q/k rows back in HF order."""
        from gguf.quants import dequantize

        config = self.hf_config
        for tensor in self._reader.tensors:
            name = self._hf_name(tensor.name)
            type_name = tensor.tensor_type.name
            if type_name not in SUPPORTED_TENSOR_TYPES:
                raise GGUFError(f"tensor {tensor.name!r} has GGUF type {type_name}, which is not supported; "
                                f"supported: {', '.join(sorted(SUPPORTED_TENSOR_TYPES))}")
            values = dequantize(tensor.data, tensor.tensor_type)
            # np.array copies: an F32 tensor comes back as a read-only view of the memory-mapped file.
            values = np.array(values, dtype=np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))
            weight = torch.from_numpy(values)
            if self.architecture in _PERMUTED_QK:
                if ".q_proj." in name:
                    weight = _unpermute_rows(weight, config["num_attention_heads"])
                elif ".k_proj." in name:
                    weight = _unpermute_rows(weight, config["num_key_value_heads"])
            yield name, weight.to(dtype).contiguous()

    @staticmethod
    def _hf_name(gguf_name: str) -> str:
        if gguf_name in GLOBAL_TENSORS:
            return GLOBAL_TENSORS[gguf_name]
        parts = gguf_name.split(".", 2)
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_TENSORS:
            return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}"
        raise GGUFError(f"GGUF tensor {gguf_name!r} has no counterpart in our models")


def _unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undoes llama.cpp's q/k row permutation: per head, interleaved pairs back to two halves.

    head_dim 4, one head: stored rows [r0, r2, r1, r3] (pairs (0, 2), (1, 3) side by side)
    -> HF rows [r0, r1, r2, r3].
    """
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def load_gguf_tokenizer(path: str):
    """transformers' fast tokenizer built from the file's tokenizer.ggml.* metadata (its chat template too)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                             gguf_file=os.path.basename(path))
    except (OSError, ValueError, KeyError) as error:
        raise GGUFError(f"cannot build a tokenizer from the GGUF metadata of {path!r}: {error}") from error


def convert_gguf(gguf_path: str, out_dir: str, dtype: torch.dtype = torch.float32) -> str:
    """Writes `gguf_path` as a Hugging Face checkpoint directory at `out_dir`; returns its absolute path.

    `out_dir` must not exist or be empty. Everything is written into a temp dir beside it and renamed
    into place, so a reader sees either no checkpoint or a whole one (FileExistsError if another writer
    finished first)."""
    import transformers
    from safetensors.torch import save_file

    checkpoint = GGUFCheckpoint(gguf_path)
    config_dict = checkpoint.hf_config
    out_dir = os.path.abspath(out_dir)
    with atomic_directory(out_dir) as temp_dir:
        tokenizer = load_gguf_tokenizer(gguf_path)
        hf_config = transformers.AutoConfig.for_model(**config_dict)
        hf_config.dtype = dtype
        hf_config.save_pretrained(temp_dir)
        _add_legacy_config_keys(temp_dir, config_dict["rope_theta"], dtype)
        transformers.GenerationConfig(bos_token_id=config_dict["bos_token_id"],
                                      eos_token_id=config_dict["eos_token_id"]).save_pretrained(temp_dir)
        tokenizer.save_pretrained(temp_dir)
        _make_tokenizer_config_portable(temp_dir, tokenizer.chat_template)
        _write_safetensors(checkpoint.tensors(dtype), temp_dir, save_file)
    return out_dir


def _add_legacy_config_keys(directory: str, rope_theta: float, dtype: torch.dtype) -> None:
    """Also the v4 spellings (`rope_theta`, `torch_dtype`), for readers that predate transformers 5."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(rope_theta=rope_theta, torch_dtype=str(dtype).removeprefix("torch."))
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def _make_tokenizer_config_portable(directory: str, chat_template: str | None) -> None:
    """tokenizer_config.json that older transformers (vLLM's pinned one) read too.

    transformers 5 names its own class (`TokenizersBackend`, unknown to 4.x) and keeps the chat template
    only in chat_template.jinja; the generic fast class and the template inline load everywhere."""
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if chat_template:
        config["chat_template"] = chat_template
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def _write_safetensors(tensors: Iterator[tuple[str, torch.Tensor]], directory: str, save_file) -> None:
    """model.safetensors, or shards of about 2 GiB plus model.safetensors.index.json.

    Each shard is written as soon as it is full, so at most one shard's tensors are in memory."""
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    shard_names: list[list[str]] = []

    def flush() -> None:
        save_file(shard, os.path.join(directory, f"shard-{len(shard_names)}.tmp"), metadata={"format": "pt"})
        shard_names.append(list(shard))
        shard.clear()

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > _SHARD_BYTES:
            flush()
            shard_bytes = 0
        shard[name] = tensor
        shard_bytes += size
    flush()
    if len(shard_names) == 1:
        os.rename(os.path.join(directory, "shard-0.tmp"), os.path.join(directory, "model.safetensors"))
        return
    weight_map = {}
    for index, names in enumerate(shard_names):
        file_name = f"model-{index + 1:05d}-of-{len(shard_names):05d}.safetensors"
        os.rename(os.path.join(directory, f"shard-{index}.tmp"), os.path.join(directory, file_name))
        weight_map.update({name: file_name for name in names})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
