"""DraftModel: a small model beside the target that proposes draft tokens (``speculative_method="draft"``).

Its KV lives in a pool of its own with the target's block count and block size, so the scheduler's block
tables serve both: position p of a request sits in the same slot of both pools. Per request it counts the
tokens it holds KV for. Each step (``propose``) it first catches up over the known tokens the target
computes this step (prompt chunks too), then drafts: d_1 from its logits at the last known token, each
further d_j from one batched single-token forward of d_(j-1), every draw kept with its distribution q_j
for verification (``sample/rejection.py``). ``settle`` then counts the drafts' KV that stands; a rejected
draft's KV is simply not counted and written over.

A request new to the runner (first scheduled, or back after preemption) starts from 0 whatever its
prefix-cache hits: those give the target KV, but the draft's slots of a shared block are not known to hold
the draft's own KV. Worked example (k = 3, 10 known tokens, all computed but the last by both models):
catch-up computes position 9 -> q_1, d_1; forwards of d_1 (position 10) and d_2 (11) -> q_2, q_3, d_2, d_3.
Two accepted: the draft's KV for positions 0..11 stands (12 tokens); all three: also 0..11, d_3 comes next step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from splitfuse.platforms.cpu.linear import padded_rows
from splitfuse.sample.sampler import Sampler, SamplingRow, is_greedy
from splitfuse.step import SchedulerOutput
from splitfuse.worker.input_batch import RequestState, batch_order, prepare_inputs
from splitfuse.worker.model_on_device import ModelOnDevice


@dataclass
class _DraftView:
    """What ``prepare_inputs`` reads of a request, at the draft model's own computed count."""

    all_token_ids: list[int]
    block_table: list[int]
    num_computed_tokens: int


class DraftModel:
    def __init__(self, loaded: ModelOnDevice, vocab_size: int, *, eos_token_ids: frozenset[int], seed: int,
                 max_num_batched_tokens: int, max_num_seqs: int) -> None:
        """``loaded``: the draft checkpoint placed as the target is (its KV pool: the target's block count and size)."""
        self.platform, self.backend, self.model = loaded.platform, loaded.backend, loaded.model
        self.kv_store, self.sliding_windows = loaded.kv_store, loaded.sliding_windows
        self.device, self.block_size = loaded.platform.device, loaded.kv_store.block_size
        # Its own batch generator: drafting must not shift the target sampler's random stream.
        self.sampler = Sampler(vocab_size, eos_token_ids, seed=seed + 1, argmax=self.platform.ops.argmax)
        self.num_computed: dict[str, int] = {}  # request id -> tokens whose draft KV stands
        self.model.warm_up(max_num_batched_tokens, max_num_seqs)

    def update(self, scheduler_output: SchedulerOutput) -> None:
        """Forgets finished requests; a request that comes (back) whole starts from 0."""
        for request_id in scheduler_output.finished_request_ids:
            self.num_computed.pop(request_id, None)
        for new in scheduler_output.new_requests:
            self.num_computed[new.request_id] = 0

    def propose(self, states: list[RequestState], known_lens: np.ndarray, num_drafts: list[int]
                ) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
        """Catches up over every scheduled request's known tokens (``known_lens[i]`` from its
        ``num_computed_tokens`` on); returns ``num_drafts[i]`` drafts per request and, for requests that
        sample (temperature > 0), their draft distributions q [k, vocab] (CPU fp32)."""
        views, catch_up_lens = [], []
        for state, known in zip(states, known_lens.tolist()):
            start = min(self.num_computed.get(state.request_id, 0), state.num_computed_tokens)
            end = state.num_computed_tokens + known
            views.append(_DraftView(state.all_token_ids, state.block_table, start))
            catch_up_lens.append(end - start)
            self.num_computed[state.request_id] = end
        drafting = [i for i, k in enumerate(num_drafts) if k > 0]
        logits = self._forward(views, catch_up_lens, None, drafting)
        drafts: list[list[int]] = [[] for _ in states]
        draft_probs: dict[int, list[torch.Tensor]] = {i: [] for i in drafting
                                                      if not is_greedy(states[i].params)}
        active = drafting
        for j in range(max(num_drafts, default=0)):
            if j > 0:  # d_j at the position after the last known token + j - 1: one token each
                active = [i for i in active if num_drafts[i] > j]
                step_views = [_DraftView(states[i].all_token_ids, states[i].block_table,
                                         len(states[i].all_token_ids) + j - 1) for i in active]
                logits = self._forward(step_views, [1] * len(active), [[drafts[i][-1]] for i in active],
                                       list(range(len(active))))
            rows = [SamplingRow(states[i].params, states[i].prompt_token_ids,
                                states[i].output_token_ids + drafts[i], states[i].generator) for i in active]
            sampled = [r for r, i in enumerate(active) if i in draft_probs]
            if sampled:
                probs = self.sampler.probabilities(logits[sampled], [rows[r] for r in sampled]).cpu()
                for r, row_probs in zip(sampled, probs):
                    draft_probs[active[r]].append(row_probs)
            for i, token_id in zip(active, self.sampler(logits, rows).token_ids):
                drafts[i].append(token_id)
        return drafts, {states[i].request_id: torch.stack(q) for i, q in draft_probs.items()}

    def settle(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        """Counts the drafts' KV that stands: d_1 .. d_(k-1) were forwarded, the accepted ones of them hold."""
        if request_id in self.num_computed:
            self.num_computed[request_id] += min(num_accepted, num_drafts - 1)

    def _forward(self, views: list[_DraftView], query_lens: list[int], drafts: Optional[list[list[int]]],
                 logit_of: list[int]) -> torch.Tensor:
        """One draft forward; logits at the last token of the requests ``logit_of`` (indices into views)."""
        order = batch_order(views, query_lens)
        position_of = {request: rank for rank, request in enumerate(order)}
        lens = np.array([query_lens[i] for i in order], dtype=np.int64)
        token_ids, positions, layout = prepare_inputs(
            [views[i] for i in order], lens, self.block_size, None if drafts is None else [drafts[i] for i in order])
        layout.slot_mapping = layout.slot_mapping.to(self.device)
        if self.model.pads_rows:
            padding = padded_rows(len(token_ids)) - len(token_ids)
            token_ids.extend([0] * padding)
            positions = np.concatenate([positions, np.zeros(padding, dtype=positions.dtype)])
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        metadata = self.backend.plan(layout, self.sliding_windows)
        hidden = self.model(input_ids, torch.from_numpy(positions).to(self.device), self.kv_store.layers, metadata)
        if not logit_of:
            return hidden[:0]
        last_rows = layout.query_start_loc[1:][[position_of[i] for i in logit_of]] - 1
        return self.model.compute_logits(hidden[torch.from_numpy(last_rows).to(self.device)])
