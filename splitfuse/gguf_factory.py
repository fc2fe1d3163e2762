"""Writes small GGUF files for tests, laid out the way llama.cpp's converter writes them.

The weights come from a Hugging Face model in memory; the tokenizer metadata (`tokenizer.ggml.*`, chat
template) is copied from a real GGUF file, so transformers can build the tokenizer and load the model
from the file we write: it is the oracle that reads the file independently of splitfuse. Each weight
can get its own tensor type, so one file covers every quantization format.

For the `llama` architecture the q/k rows are permuted exactly as llama.cpp's converter does (HF's
rotate-half pairs (i, i + d/2) become neighbours (2i, 2i + 1) per head); the loader must undo it.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch

from splitfuse.models.gguf import GLOBAL_TENSORS, LAYER_TENSORS

# For the K-quant types gguf cannot quantize, tensors get random quants and sub-block scales with fixed
# fp16 super-block scales: (block bytes, offset of d, offset of dmin, dmin / d) in llama.cpp's layouts.
# dmin / d is the mean quant (7.5 for 4 bits, ...), so that the weights centre on zero like trained ones.
_D_SCALE = 0.002
_K_QUANT_BLOCKS = {"Q4_K": (144, 0, 2, 7.5), "Q5_K": (176, 0, 2, 15.5), "Q2_K": (84, 80, 82, 1.5),
                   "Q6_K": (210, 208, None, 0.0), "Q3_K": (110, 108, None, 0.0)}

# HF name -> GGUF name: the loader's tables (splitfuse.models.gguf) read backwards.
_LAYER_NAMES = {hf: gguf for gguf, hf in LAYER_TENSORS.items()}
_GLOBAL_NAMES = {hf: gguf for gguf, hf in GLOBAL_TENSORS.items()}


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.rest
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def permute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation: per head, the rotate-half halves become interleaved pairs."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _encode(values: np.ndarray, type_name: str, rng: np.random.Generator) -> tuple[np.ndarray, object]:
    """(data for GGUFWriter.add_tensor, its GGML type) for float32 `values` in `type_name`."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    qtype = GGMLQuantizationType[type_name]
    if type_name not in _K_QUANT_BLOCKS:
        return quantize(values, qtype), qtype
    block_bytes, d_offset, dmin_offset, dmin_ratio = _K_QUANT_BLOCKS[type_name]
    rows, columns = values.shape
    blocks = rng.integers(0, 256, size=(rows, columns // 256, block_bytes), dtype=np.uint8)
    blocks[:, :, d_offset:d_offset + 2] = np.frombuffer(np.float16(_D_SCALE).tobytes(), dtype=np.uint8)
    if dmin_offset is not None:
        dmin = np.float16(_D_SCALE * dmin_ratio).tobytes()
        blocks[:, :, dmin_offset:dmin_offset + 2] = np.frombuffer(dmin, dtype=np.uint8)
    return blocks.reshape(rows, -1), qtype


def write_gguf(path: str, model: torch.nn.Module, architecture: str, tokenizer_source: str,
               tensor_types: Callable[[str], str] | Mapping[str, str] = lambda name: "F32",
               seed: int = 0, extra_metadata: Mapping[str, object] | None = None) -> str:
    """Writes `model` (an HF causal LM) as GGUF `architecture` at `path`; returns `path`.

    `tensor_types` maps each HF weight name to a GGML type name ("Q4_K", "F16", ...); 1-D tensors are
    always F32, as llama.cpp writes them. `tokenizer_source` is a GGUF file whose tokenizer metadata is
    copied (its vocabulary size must be the model's)."""
    import gguf

    config = model.config
    pick = tensor_types if callable(tensor_types) else tensor_types.__getitem__
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    for key, value in (extra_metadata or {}).items():
        writer.add_key_value(key, value, _value_type(value))
    _copy_tokenizer_metadata(writer, tokenizer_source)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        values = tensor.detach().to(torch.float32).numpy()
        if architecture == "llama" and ("q_proj" in name or "k_proj" in name):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            values = permute_rows(values, heads)
        type_name = "F32" if values.ndim == 1 else pick(name)
        data, qtype = _encode(np.ascontiguousarray(values), type_name, rng)
        writer.add_tensor(gguf_name(name), data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _value_type(value: object):
    from gguf import GGUFValueType

    if isinstance(value, str):
        return GGUFValueType.STRING
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    return GGUFValueType.UINT32


def _copy_tokenizer_metadata(writer, source: str) -> None:
    import gguf

    reader = gguf.GGUFReader(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value_type = field.types[0]
        if value_type == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), value_type)
