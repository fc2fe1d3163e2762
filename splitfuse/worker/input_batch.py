"""The runner's persistent copy of each request, and the flattened ragged batch built from it each step.

``RequestState`` is updated only from ``SchedulerOutput`` diffs (``splitfuse/step.py``);
``prepare_inputs`` is a pure function of the states and the step's token counts, so its
positions, slot mapping and block tables are unit-tested with exact values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from splitfuse.attention.backend import BatchLayout
from splitfuse.sampling_params import SamplingParams
from splitfuse.step import NewRequestData, SchedulerOutput


@dataclass
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    block_table: list[int]
    num_computed_tokens: int
    # A seeded sequence draws only from its own generator, which survives preemption.
    generator: Optional[torch.Generator] = None
    all_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.all_token_ids = self.prompt_token_ids + self.output_token_ids


def update_states(requests: dict[str, RequestState], scheduler_output: SchedulerOutput) -> None:
    """Applies a step's diffs to the runner's copies: forget finished, suspend preempted, add new, extend cached."""
    for request_id in scheduler_output.finished_request_ids:
        requests.pop(request_id, None)
    for request_id in scheduler_output.preempted_request_ids:
        state = requests.get(request_id)
        if state is not None:
            state.block_table = []  # its generator stays: it resumes where it left off
    for new in scheduler_output.new_requests:
        _add_request(requests, new)
    for cached in scheduler_output.cached_requests:
        state = requests.get(cached.request_id)
        if state is None:
            raise ValueError(f"the scheduler sent a diff for {cached.request_id!r}, which the runner does not hold")
        state.output_token_ids.extend(cached.new_token_ids)
        state.all_token_ids.extend(cached.new_token_ids)
        state.block_table.extend(cached.new_block_ids)
        state.num_computed_tokens = cached.num_computed_tokens


def _add_request(requests: dict[str, RequestState], new: NewRequestData) -> None:
    previous = requests.get(new.request_id)  # a preempted request coming back keeps its generator
    generator = previous.generator if previous is not None else None
    if previous is None and new.seed is not None:
        generator = torch.Generator().manual_seed(new.seed)
    requests[new.request_id] = RequestState(
        new.request_id, list(new.prompt_token_ids), list(new.output_token_ids), new.sampling_params,
        list(new.block_ids), new.num_computed_tokens, generator)


def batch_order(states: list[RequestState], query_lens: list[int]) -> list[int]:
    """Decodes first, shortest context first (the attention backend buckets them by length); then chunks."""
    def key(i: int) -> tuple[bool, int]:
        is_decode = query_lens[i] == 1
        return (not is_decode, states[i].num_computed_tokens if is_decode else 0)
    return sorted(range(len(states)), key=key)


def prepare_inputs(states: list[RequestState], query_lens: np.ndarray, block_size: int,
                   drafts: Optional[list[list[int]]] = None) -> tuple[list[int], np.ndarray, BatchLayout]:
    """(token ids, positions, layout) of one step, requests in the given order.

    Request i computes ``query_lens[i]`` tokens from its ``num_computed_tokens`` on, its known tokens
    then ``drafts[i]`` (speculative decoding: tokens proposed after its last known one); token t of
    request i sits at position ``starts[i] + (t - query_start_loc[i])`` and writes its KV to slot
    ``block_table[position // block_size] * block_size + position % block_size``.
    """
    num_reqs = len(states)
    starts = np.array([s.num_computed_tokens for s in states], dtype=np.int64)
    query_start_loc = np.zeros(num_reqs + 1, dtype=np.int64)
    np.cumsum(query_lens, out=query_start_loc[1:])  # [2, 5, 3] -> [0, 2, 7, 10]
    num_tokens = int(query_start_loc[-1])

    token_ids: list[int] = []
    for i, (state, start, length) in enumerate(zip(states, starts.tolist(), query_lens.tolist())):
        known = state.all_token_ids[start:start + length]
        token_ids.extend(known)
        if len(known) < length:
            token_ids.extend(drafts[i][:length - len(known)])
    request_of_token = np.repeat(np.arange(num_reqs), query_lens)
    positions = np.arange(num_tokens) + np.repeat(starts - query_start_loc[:-1], query_lens)

    max_blocks = max(len(s.block_table) for s in states)
    block_tables = np.zeros((num_reqs, max_blocks), dtype=np.int64)
    for i, state in enumerate(states):
        block_tables[i, :len(state.block_table)] = state.block_table
    slots = (block_tables[request_of_token, positions // block_size] * block_size + positions % block_size)

    layout = BatchLayout(
        query_lens=query_lens, context_lens=starts + query_lens, query_start_loc=query_start_loc,
        block_tables=block_tables, slot_mapping=torch.from_numpy(slots),
        num_decodes=int(np.count_nonzero(query_lens == 1)), block_size=block_size)
    return token_ids, positions, layout
