"""ModelRunner: turns a scheduled step into one forward over the flattened ragged batch, then samples."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from splitfuse.attention.backend import BatchLayout, allocate_kv_cache
from splitfuse.engine.request import Request
from splitfuse.models.config import ArchConfig
from splitfuse.models.loader import load_model
from splitfuse.platforms import resolve_platform
from splitfuse.platforms.cpu.linear import padded_rows
from splitfuse.sample.sampler import Sampler, SamplerOutput, SamplingRow

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """The requests that sampled this step (batch order) and what they drew."""

    requests: list[Request]
    sampler_output: Optional[SamplerOutput]


class ModelRunner:
    def __init__(self, model_path: str, arch: ArchConfig, *, dtype: torch.dtype, device: torch.device,
                 num_blocks: int, block_size: int, eos_token_ids: frozenset[int], seed: int = 0,
                 attention_backend: str = "auto", max_num_batched_tokens: int = 0, max_num_seqs: int = 0,
                 batch_invariant: bool = False) -> None:
        self.arch = arch
        self.device = device
        self.block_size = block_size
        self.platform = resolve_platform(device, dtype, attention_backend=attention_backend,
                                         batch_invariant=batch_invariant, arch=arch, block_size=block_size)
        self.backend = self.platform.attention_backend
        self.model = load_model(model_path, arch, self.platform)
        self.kv_caches = allocate_kv_cache(arch.num_layers, num_blocks, block_size, arch.num_kv_heads,
                                           arch.head_dim, dtype, device)
        self.sliding_windows = tuple(sorted(set(arch.layer_sliding_windows), key=lambda w: (w is not None, w)))
        self.sampler = Sampler(arch.vocab_size, eos_token_ids, seed=seed, argmax=self.platform.ops.argmax)
        # A step has at most max_num_batched_tokens tokens and samples for at most max_num_seqs requests.
        self.model.warm_up(max_num_batched_tokens, max_num_seqs)

    @torch.inference_mode()
    def execute(self, requests: list[Request], num_new_tokens: list[int],
                block_tables: list[list[int]]) -> StepResult:
        """One forward over every scheduled token; samples for requests whose known tokens are now all computed."""
        order = _batch_order(requests, num_new_tokens)
        requests = [requests[i] for i in order]
        query_lens = np.array([num_new_tokens[i] for i in order], dtype=np.int64)
        block_tables = [block_tables[i] for i in order]
        input_ids, positions, layout = self._prepare_inputs(requests, query_lens, block_tables)
        metadata = self.backend.plan(layout, self.sliding_windows)
        hidden = self.model(input_ids, positions, self.kv_caches, metadata)

        sampling = [i for i, r in enumerate(requests) if layout.context_lens[i] == r.num_tokens]
        if not sampling:
            return StepResult([], None)
        last_rows = torch.from_numpy(layout.query_start_loc[1:][sampling] - 1).to(self.device)
        logits = self.model.compute_logits(hidden[last_rows])
        sampling_requests = [requests[i] for i in sampling]
        rows = [SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids, r.generator)
                for r in sampling_requests]
        return StepResult(sampling_requests, self.sampler(logits, rows))

    def _prepare_inputs(self, requests: list[Request], query_lens: np.ndarray,
                        block_tables: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, BatchLayout]:
        num_reqs = len(requests)
        starts = np.array([r.num_computed_tokens for r in requests], dtype=np.int64)
        query_start_loc = np.zeros(num_reqs + 1, dtype=np.int64)
        np.cumsum(query_lens, out=query_start_loc[1:])  # [2, 5, 3] -> [0, 2, 7, 10]
        num_tokens = int(query_start_loc[-1])

        token_ids: list[int] = []
        for request, start, length in zip(requests, starts.tolist(), query_lens.tolist()):
            token_ids.extend(request.all_token_ids[start:start + length])
        # Token t of request i sits at position starts[i] + (t - query_start_loc[i]).
        request_of_token = np.repeat(np.arange(num_reqs), query_lens)
        positions = np.arange(num_tokens) + np.repeat(starts - query_start_loc[:-1], query_lens)

        max_blocks = max(len(t) for t in block_tables)
        table_array = np.zeros((num_reqs, max_blocks), dtype=np.int64)
        for i, table in enumerate(block_tables):
            table_array[i, :len(table)] = table
        slots = (table_array[request_of_token, positions // self.block_size] * self.block_size
                 + positions % self.block_size)

        layout = BatchLayout(
            query_lens=query_lens, context_lens=starts + query_lens, query_start_loc=query_start_loc,
            block_tables=table_array, slot_mapping=torch.from_numpy(slots).to(self.device),
            num_decodes=int(np.count_nonzero(query_lens == 1)), block_size=self.block_size)
        if self.model.pads_rows:  # dummy tokens (id 0 at position 0) up to a precompiled matmul size
            padding = padded_rows(num_tokens) - num_tokens
            token_ids.extend([0] * padding)
            positions = np.concatenate([positions, np.zeros(padding, dtype=positions.dtype)])
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        return input_ids, torch.from_numpy(positions).to(self.device), layout


def _batch_order(requests: list[Request], num_new_tokens: list[int]) -> list[int]:
    """Decodes first, shortest context first (the attention backend buckets them by length); then chunks."""
    def key(i: int) -> tuple[bool, int]:
        is_decode = num_new_tokens[i] == 1
        return (not is_decode, requests[i].num_computed_tokens if is_decode else 0)
    return sorted(range(len(requests)), key=key)
