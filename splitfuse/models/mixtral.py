"""Mixtral: the Llama decoder with a sparse mixture-of-experts MLP (top-k routing, renormalized)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from splitfuse.models.config import ArchConfig
from splitfuse.models.llama import LlamaForCausalLM
from splitfuse.platforms.cpu.linear import in_row_tiles
from splitfuse.platforms.ops import Ops


class SparseMoE(nn.Module):
    """Each token goes to its ``top_k`` experts, weighted by the renormalized router softmax.

    ``row_tile`` (batch invariance): each expert's matmuls run in calls of exactly that many rows, so a
    token's result does not depend on how many other tokens chose the same expert this step.
    """

    def __init__(self, config: ArchConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.intermediate_size = config.intermediate_size
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        # Expert e: w13[e] = [w1; w3] (gate and up stacked), w2[e] the down projection.
        self.w13 = nn.Parameter(torch.empty(config.num_experts, 2 * config.intermediate_size, config.hidden_size))
        self.w2 = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, config.intermediate_size))
        self.row_tile: Optional[int] = None

    def _expert_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.row_tile is None:
            return F.linear(x, weight)
        return in_row_tiles(lambda rows: F.linear(rows, weight), x, self.row_tile)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(router_probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        # Group (token, slot) pairs by expert once, then one matmul pair per active expert.
        flat_experts = experts.flatten()
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        token_of_pair = order // self.top_k
        weight_of_pair = weights.flatten()[order]
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            tokens = token_of_pair[start:start + count]
            gate, up = self._expert_linear(x[tokens], self.w13[expert]).split(self.intermediate_size, dim=-1)
            expert_out = self._expert_linear(F.silu(gate) * up, self.w2[expert])
            out.index_add_(0, tokens, expert_out * weight_of_pair[start:start + count, None])
            start += count
        return out


class MixtralForCausalLM(LlamaForCausalLM):
    @staticmethod
    def make_mlp(config: ArchConfig, platform_ops: Ops) -> nn.Module:
        return SparseMoE(config)  # (its activation is torch's: the experts' products are gathered rows)

    def prepare_for_inference(self) -> None:
        super().prepare_for_inference()
        for layer in self.layers:  # bf16 on the CPU, batch-invariant: the experts run in fixed row tiles
            layer.mlp.row_tile = self.platform.row_tile

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        if "rotary_emb.inv_freq" in name:
            return None
        # model.layers.0.block_sparse_moe.experts.3.w1.weight -> layers.0.mlp.w13[3], shard 0
        return name.removeprefix("model.").replace(".block_sparse_moe.", ".mlp.")
