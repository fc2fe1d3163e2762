"""ArchConfig: the architecture facts our models need, read from any HF config.json (unknown keys ignored)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

# architectures[0] -> (our model family, family flags)
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
    "MixtralForCausalLM": "mixtral",
}

# model_type -> architecture, for a config.json without `architectures` (some converted checkpoints).
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM"}


@dataclass(frozen=True)
class ArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict[str, Any]]
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    layer_sliding_windows: tuple[Optional[int], ...]
    num_experts: int = 0
    num_experts_per_tok: int = 0
    checkpoint_dtype: Optional[str] = None
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def family(self) -> str:
        return ARCHITECTURES[self.architecture]

    @classmethod
    def from_dir(cls, path: str) -> "ArchConfig":
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no config.json in {path!r}: not a Hugging Face checkpoint directory")
        with open(config_path) as f:
            return cls.from_hf_dict(json.load(f))

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ArchConfig":
        architecture = (d.get("architectures") or [_MODEL_TYPES.get(d.get("model_type"), "?")])[0]
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {architecture!r} (model_type {d.get('model_type')!r}); "
                             f"supported: {', '.join(sorted(ARCHITECTURES))}")
        model_type = d.get("model_type", "")
        num_heads = d["num_attention_heads"]
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_theta = float(d.get("rope_theta", rope.pop("rope_theta", 10000.0)))
        rope.pop("rope_theta", None)
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=architecture,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope or None,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2" or bool(d.get("attention_bias", False)),
            o_bias=bool(d.get("attention_bias", False)) and model_type != "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            layer_sliding_windows=_sliding_windows(d, model_type),
            num_experts=d.get("num_local_experts", 0),
            num_experts_per_tok=d.get("num_experts_per_tok", 0),
            checkpoint_dtype=d.get("dtype") or d.get("torch_dtype"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _sliding_windows(d: dict[str, Any], model_type: str) -> tuple[Optional[int], ...]:
    """The attention window of each layer (None: full attention).

    Mistral and Mixtral window every layer when ``sliding_window`` is set; Qwen2/Qwen3
    only with ``use_sliding_window``, from ``max_window_layers`` on; a ``layer_types``
    list, where the checkpoint has one, says it per layer.
    """
    num_layers = d["num_hidden_layers"]
    window = d.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
        window = None
    if window is None:
        return (None,) * num_layers
    layer_types = d.get("layer_types")
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if model_type in ("qwen2", "qwen3"):
        first = d.get("max_window_layers", num_layers)
        return tuple(window if i >= first else None for i in range(num_layers))
    return (window,) * num_layers
