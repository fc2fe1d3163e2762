"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3 by flags) over a flattened ragged batch.

The forward passes call their submodules' ``forward`` directly: ``nn.Module.__call__`` (the hooks
machinery, unused here) costs a few microseconds a call, and a decode step makes about a hundred.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from splitfuse.attention.backend import AttentionBackend
from splitfuse.layers.norm import RMSNorm
from splitfuse.layers.rotary import RotaryEmbedding
from splitfuse.models.config import ArchConfig
from splitfuse.platforms import Platform
from splitfuse.platforms.cpu.decoder import CpuDecoder
from splitfuse.platforms.cpu.linear import AmxLinear, PackedLinear, padded_rows, warm_up
from splitfuse.platforms.ops import Ops, torch_silu_and_mul

KVCache = tuple[torch.Tensor, torch.Tensor]
logger = logging.getLogger(__name__)


class LlamaAttention(nn.Module):
    def __init__(self, config: ArchConfig, layer_index: int, rotary: RotaryEmbedding,
                 backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.sliding_window = config.layer_sliding_windows[layer_index]
        # q, k and v in one matmul: rows [0, q_size) are q, then k, then v.
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        # The torch op: q and k are strided [T, heads, head_dim] views of the qkv output.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.rotary = rotary
        self.backend = backend

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: KVCache,
                attn_metadata: Any) -> torch.Tensor:
        qkv = self.qkv_proj.forward(hidden)
        query, key, value = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        query = query.view(-1, self.num_heads, self.head_dim)
        key = key.view(-1, self.num_kv_heads, self.head_dim)
        value = value.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            query, key = self.q_norm.forward(query), self.k_norm.forward(key)
        query, key = self.rotary.forward(positions, query, key)
        out = self.backend.forward(query, key, value, kv_cache, attn_metadata,
                                   scale=self.scale, sliding_window=self.sliding_window)
        return self.o_proj.forward(out.reshape(-1, self.q_size))


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up fused into one matmul.

    ``silu_and_mul``: the platform's op (it gets gate_up_proj's contiguous output); None once
    gate_up_proj applies it itself (``AmxLinear.silu_mul``, see ``LlamaForCausalLM.prepare_for_inference``).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 silu_and_mul: Optional[Callable[[torch.Tensor], torch.Tensor]] = torch_silu_and_mul) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.silu_and_mul = silu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj.forward(x)
        if self.silu_and_mul is None:
            return self.down_proj.forward(gate_up)  # the kernel has applied silu(gate) * up already
        return self.down_proj.forward(self.silu_and_mul(gate_up))


class DecoderLayer(nn.Module):
    def __init__(self, config: ArchConfig, layer_index: int, rotary: RotaryEmbedding,
                 platform: Platform, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_index, rotary, platform.attention_backend)
        self.mlp = mlp
        norm = platform.ops.rms_norm  # hidden states: 2-D rows of unit stride
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, op=norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, op=norm)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                kv_cache: KVCache, attn_metadata: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block; the residual stream is carried separately so each add fuses into the next norm.

        Returns (this block's MLP output, the residual stream before it); their sum is the block's output.
        """
        if residual is None:
            hidden, residual = self.input_layernorm.forward(hidden), hidden
        else:
            hidden, residual = self.input_layernorm.forward(hidden, residual)
        hidden = self.self_attn.forward(positions, hidden, kv_cache, attn_metadata)
        hidden, residual = self.post_attention_layernorm.forward(hidden, residual)
        return self.mlp.forward(hidden), residual


class LlamaForCausalLM(nn.Module):
    """Parameter names follow the checkpoint's, except the fused ``qkv_proj`` and ``gate_up_proj``."""

    # checkpoint name fragment -> (our fragment, shard index within the fused weight)
    fused_weights: dict[str, tuple[str, int]] = {
        ".q_proj.": (".qkv_proj.", 0), ".k_proj.": (".qkv_proj.", 1), ".v_proj.": (".qkv_proj.", 2),
        ".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1),
    }

    def __init__(self, config: ArchConfig, platform: Platform) -> None:
        super().__init__()
        self.config = config
        self.platform = platform
        rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                 config.rope_scaling, op=platform.ops.rotary)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, rotary, platform, self.make_mlp(config, platform.ops))
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, op=platform.ops.rms_norm)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        self.packed_logits: AmxLinear | PackedLinear | None = None
        self.pads_rows = False  # whether forward wants its token count padded to ``padded_rows`` (oneDNN layers)
        self.cpu_decoder: CpuDecoder | None = None  # all layers in one C call where it applies (bf16 on AMX)

    @staticmethod
    def make_mlp(config: ArchConfig, platform_ops: Ops) -> nn.Module:
        return GatedMLP(config.hidden_size, config.intermediate_size, config.mlp_bias, platform_ops.silu_and_mul)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                attn_metadata: Any) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]."""
        hidden, residual = self.embed_tokens(input_ids), None
        if self.cpu_decoder is not None and self.cpu_decoder.takes(attn_metadata):
            hidden, residual = self.cpu_decoder.run(hidden, positions, kv_caches, attn_metadata)
        else:
            for layer, kv_cache in zip(self.layers, kv_caches):
                hidden, residual = layer.forward(positions, hidden, residual, kv_cache, attn_metadata)
        return self.norm.forward(hidden, residual)[0]

    def prepare_for_inference(self) -> None:
        """After the weights are loaded: pack linear weights where the platform does (bf16 on CPU).

        With ``batch_invariant`` the packed layers' per-row results do not depend on the row count
        (platforms/cpu/linear.py); they need no padded batch.
        """
        linears = self.platform.linears
        if linears is None:
            return
        weight = self.embed_tokens.weight
        lm_weight = weight if self.lm_head is None else self.lm_head.weight
        self.packed_logits = linears.pack(lm_weight, None)
        self.lm_head = None  # its weight lives on only in packed_logits (a tied one stays in embed_tokens)
        linears.pack_layers(self.layers)
        for layer in self.layers:
            gate_up = getattr(layer.mlp, "gate_up_proj", None)
            if isinstance(gate_up, AmxLinear) and gate_up.silu_mul:
                layer.mlp.silu_and_mul = None  # the kernel applies it
        self.pads_rows = any(isinstance(module, PackedLinear) and module.row_tile is None
                             for module in self.layers.modules())
        self.cpu_decoder = self.platform.fused_decoder(self)

    def warm_up(self, max_tokens: int, max_logit_rows: int) -> None:
        """Compiles the oneDNN matmuls for every padded row count a step can have (platforms/cpu/linear.py)."""
        logits = self.packed_logits if isinstance(self.packed_logits, PackedLinear) else None
        if self.pads_rows or logits is not None:
            seconds = warm_up(self.layers, max_tokens, logits, max_logit_rows)
            logger.info("compiled the packed matmuls for up to %d tokens in %.1f s", max_tokens, seconds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed_logits is not None:
            rows = hidden.shape[0]
            if (isinstance(self.packed_logits, PackedLinear) and self.packed_logits.row_tile is None
                    and padded_rows(rows) != rows):
                hidden = torch.cat([hidden, hidden.new_zeros(padded_rows(rows) - rows, hidden.shape[1])])
            return self.packed_logits(hidden)[:rows]
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)

    def shard_sizes(self, fused_name: str) -> list[int]:
        """Row sizes of the pieces of a fused weight, e.g. qkv_proj -> [q_size, kv_size, kv_size]."""
        if ".qkv_proj." in fused_name:
            attn = self.layers[0].self_attn
            return [attn.q_size, attn.kv_size, attn.kv_size]
        size = self.config.intermediate_size
        return [size, size]

    @staticmethod
    def checkpoint_name(name: str) -> Optional[str]:
        """Our parameter name for a checkpoint tensor name (None: not a parameter of ours)."""
        if "rotary_emb.inv_freq" in name:
            return None
        return name.removeprefix("model.")
