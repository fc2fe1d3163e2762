"""A step's Llama decoder layers in one C call (csrc/decoder.c): the Python forward without the Python.

The layer-by-layer forward spends a good part of a decode step in Python between its ~80 kernel
calls (docs/benchmarks.md); ``CpuDecoder.run`` makes them from C, with the same arguments in the
same order, so the results are the same bit for bit. It serves bf16 Llama-family models whose
linear layers all run on the AMX kernel (no q/k norms, no MoE), in steps whose attention is all
the paged kernel's (no prompt chunk long enough for SDPA); ``CpuDecoder.build`` returns None for
a model it cannot serve. It reads the model's layers by their attribute names (``self_attn``,
``mlp.gate_up_proj``, ...), so it needs nothing from the model's module.
"""

from __future__ import annotations

import ctypes
from typing import Any, Optional

import torch

from splitfuse.platforms.cpu.attention import CpuPagedBackend, CpuPagedMetadata
from splitfuse.platforms.cpu.c_interface import DECODER_LAYER, DECODER_STEP, structure
from splitfuse.platforms.cpu.kernels import CpuKernels
from splitfuse.platforms.cpu.linear import AmxLinear

_Layer = structure(DECODER_LAYER)
_Step = structure(DECODER_STEP)


def _pointer(tensor: Optional[torch.Tensor]) -> Optional[int]:
    return None if tensor is None else tensor.data_ptr()


class CpuDecoder:
    def __init__(self, layers: Any, library: ctypes.CDLL) -> None:
        self.layers = layers  # the model's nn.ModuleList: keeps every weight the pointers point at alive
        first = layers[0]
        attn = first.self_attn
        self.hidden_size = first.input_layernorm.weight.shape[0]
        self.intermediate_size = first.mlp.intermediate_size
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.eps, self.scale, self.rotary = first.input_layernorm.eps, attn.scale, attn.rotary
        self._function = library.decoder_layers  # (its argument types are set from c_interface.py)
        self._structs: Optional[ctypes.Array] = None
        self._kv_pointers: list[tuple[int, int]] = []

    @classmethod
    def build(cls, model: Any, kernels: CpuKernels) -> Optional[CpuDecoder]:
        """The fused decoder for this model's packed layers, or None where it does not apply (module docstring)."""
        if not len(model.layers):
            return None
        first = model.layers[0]
        constants = (first.input_layernorm.eps, first.self_attn.scale, first.self_attn.rotary)
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            # A gated MLP has gate_up_proj and down_proj (a mixture of experts has neither).
            if (not hasattr(mlp, "gate_up_proj") or not hasattr(mlp, "down_proj") or attn.q_norm is not None
                    or not isinstance(attn.backend, CpuPagedBackend)):
                return None
            linears = [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
            norms = [layer.input_layernorm, layer.post_attention_layernorm]
            if (not all(isinstance(linear, AmxLinear) for linear in linears) or not mlp.gate_up_proj.silu_mul
                    or any(norm.weight.dtype != torch.bfloat16 or norm.eps != constants[0] for norm in norms)
                    or (attn.scale, attn.rotary) != constants[1:] or attn.rotary.cos.dtype != torch.float32):
                return None
        return cls(model.layers, kernels.library)

    @staticmethod
    def takes(attn_metadata: CpuPagedMetadata) -> bool:
        """Whether this step fits: its attention all the paged kernel's (no SDPA chunks).

        Everything else was settled at build: the backend is the paged kernel's (so the metadata is
        its), the model is bf16 (so is its KV cache), and the runner's positions and slots are int64.
        """
        return not attn_metadata.chunks

    def _layer_structs(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> ctypes.Array:
        kv_pointers = [(key.data_ptr(), value.data_ptr()) for key, value in kv_caches]
        if self._structs is None or kv_pointers != self._kv_pointers:
            structs = (_Layer * len(self.layers))()
            for struct, layer, (key, value) in zip(structs, self.layers, kv_pointers):
                attn, mlp = layer.self_attn, layer.mlp
                struct.input_norm = layer.input_layernorm.weight.data_ptr()
                struct.post_norm = layer.post_attention_layernorm.weight.data_ptr()
                for name, linear in (("qkv", attn.qkv_proj), ("o", attn.o_proj), ("gate_up", mlp.gate_up_proj),
                                     ("down", mlp.down_proj)):
                    setattr(struct, name, linear.packed_weight.data_ptr())
                    setattr(struct, f"{name}_bias", _pointer(linear.bias))
                struct.key_cache, struct.value_cache = key, value
                struct.window = attn.sliding_window or 0
            self._structs, self._kv_pointers = structs, kv_pointers
        return self._structs

    def run(self, hidden: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
            metadata: CpuPagedMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: the embeddings [T, hidden], overwritten -> (last MLP output, residual stream before it)."""
        tokens = hidden.shape[0]
        if (hidden.shape[1] != self.hidden_size or metadata.slot_mapping.shape[0] != tokens
                or positions.shape[0] != tokens):
            raise ValueError(f"hidden {tuple(hidden.shape)} with {positions.shape[0]} positions and "
                             f"{metadata.slot_mapping.shape[0]} slots")
        hidden = hidden.contiguous()
        residual = torch.empty_like(hidden)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        scratch = [torch.empty(tokens, columns, dtype=hidden.dtype)  # normed, qkv, attention, activation
                   for columns in (self.hidden_size, q_size + 2 * kv_size, q_size, self.intermediate_size)]
        block_tables, query_start_loc, context_lens, requests = metadata.pointers
        step = _Step(tokens, self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads,
                     self.head_dim, metadata.block_size, self.eps, self.scale, positions.data_ptr(),
                     self.rotary.cos.data_ptr(), self.rotary.sin.data_ptr(), metadata.slot_mapping.data_ptr(),
                     block_tables, metadata.block_tables.shape[1], query_start_loc, context_lens, requests,
                     len(metadata.kernel_requests), *(buffer.data_ptr() for buffer in scratch))
        self._function(ctypes.addressof(self._layer_structs(kv_caches)), len(self.layers), ctypes.byref(step),
                       hidden.data_ptr(), residual.data_ptr())
        return hidden, residual
