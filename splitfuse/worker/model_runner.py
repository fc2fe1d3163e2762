"""ModelRunner: keeps a persistent copy of each scheduled request, runs one forward over the ragged batch, samples.

It is fed only ``SchedulerOutput`` (``splitfuse/step.py``) and answers ``ModelRunnerOutput``;
it imports nothing from ``engine/``. Which requests sample is the scheduler's call
(``sampling_request_ids``); which sampled tokens are kept is the scheduler's too: the runner
learns accepted tokens from the next step's ``CachedRequestData.new_token_ids``.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from splitfuse.models.config import ArchConfig
from splitfuse.models.loader import load_model
from splitfuse.platforms import resolve_platform
from splitfuse.platforms.cpu.linear import padded_rows
from splitfuse.sample.grammar import disallowed_tokens
from splitfuse.sample.sampler import GrammarMasks, Sampler, SamplingRow
from splitfuse.step import KVOperation, ModelRunnerOutput, SchedulerOutput
from splitfuse.worker.input_batch import RequestState, batch_order, prepare_inputs, update_states
from splitfuse.worker.kv_store import KVStore

logger = logging.getLogger(__name__)


def grammar_masks(scheduler_output: SchedulerOutput, row_of: dict[str, int], vocab_size: int
                  ) -> Optional[GrammarMasks]:
    """Structured output: the step's bitmask rows as the sampler's masks (``row_of``: request id -> its row)."""
    request_ids = scheduler_output.grammar_request_ids
    if not request_ids:
        return None
    bitmask = np.frombuffer(scheduler_output.grammar_bitmask, dtype=np.int32).reshape(len(request_ids), -1)
    return GrammarMasks([row_of[request_id] for request_id in request_ids],
                        torch.from_numpy(disallowed_tokens(bitmask, vocab_size)))


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
        self.kv_store = KVStore(self.backend, arch.num_layers, num_blocks, block_size, arch.num_kv_heads,
                                arch.head_dim, dtype, device)
        self.sliding_windows = tuple(sorted(set(arch.layer_sliding_windows), key=lambda w: (w is not None, w)))
        self.sampler = Sampler(arch.vocab_size, eos_token_ids, seed=seed, argmax=self.platform.ops.argmax)
        self.requests: dict[str, RequestState] = {}
        # A step has at most max_num_batched_tokens tokens and samples for at most max_num_seqs requests.
        self.model.warm_up(max_num_batched_tokens, max_num_seqs)

    @property
    def kv_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.kv_store.layers

    # -- the persistent batch ------------------------------------------------------------

    def apply_kv_operations(self, operations: list[KVOperation]) -> None:
        for operation in operations:
            if operation.kind != "copy":
                raise ValueError(f"KV operation {operation.kind!r} is not supported by this runner")
            self.kv_store.copy_blocks(operation.src_block_ids, operation.dst_block_ids)

    # -- one step -------------------------------------------------------------------------

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """One forward over every scheduled token; samples for the scheduler's sampling requests."""
        update_states(self.requests, scheduler_output)
        self.apply_kv_operations(scheduler_output.kv_operations)
        if scheduler_output.is_empty:
            return ModelRunnerOutput()
        scheduled = scheduler_output.num_scheduled_tokens
        states = [self.requests[request_id] for request_id in scheduled]
        counts = list(scheduled.values())
        order = batch_order(states, counts)
        states = [states[i] for i in order]
        query_lens = np.array([counts[i] for i in order], dtype=np.int64)
        token_ids, positions, layout = prepare_inputs(states, query_lens, self.block_size)
        layout.slot_mapping = layout.slot_mapping.to(self.device)
        if self.model.pads_rows:  # dummy tokens (id 0 at position 0) up to a precompiled matmul size
            padding = padded_rows(len(token_ids)) - len(token_ids)
            token_ids.extend([0] * padding)
            positions = np.concatenate([positions, np.zeros(padding, dtype=positions.dtype)])
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        metadata = self.backend.plan(layout, self.sliding_windows)
        hidden = self.model(input_ids, torch.from_numpy(positions).to(self.device), self.kv_caches, metadata)

        sampling_ids = set(scheduler_output.sampling_request_ids)
        rows = [i for i, state in enumerate(states) if state.request_id in sampling_ids]
        if not rows:
            return ModelRunnerOutput()
        last_rows = torch.from_numpy(layout.query_start_loc[1:][rows] - 1).to(self.device)
        logits = self.model.compute_logits(hidden[last_rows])
        sampling_states = [states[i] for i in rows]
        masks = grammar_masks(scheduler_output, {s.request_id: i for i, s in enumerate(sampling_states)},
                              self.arch.vocab_size)
        sampled = self.sampler(logits, [SamplingRow(s.params, s.prompt_token_ids, s.output_token_ids, s.generator)
                                        for s in sampling_states], masks)
        return ModelRunnerOutput(
            [s.request_id for s in sampling_states], [[token_id] for token_id in sampled.token_ids],
            [None if lp is None else [lp] for lp in sampled.logprobs])
