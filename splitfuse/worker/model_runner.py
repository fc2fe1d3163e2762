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

from splitfuse.attention.backend import BatchLayout
from splitfuse.models.config import ArchConfig
from splitfuse.platforms.cuda.graphs import DecodeGraphs, capture_sizes
from splitfuse.platforms.cuda.memory import kv_cache_bytes, profile_peak_bytes
from splitfuse.platforms.cpu.linear import padded_rows
from splitfuse.sample.grammar import disallowed_tokens
from splitfuse.sample.rejection import rejection_sample
from splitfuse.sample.sampler import GrammarMasks, Sampler, SamplingRow, compute_logprobs
from splitfuse.step import KVOperation, ModelRunnerOutput, SchedulerOutput
from splitfuse.worker.draft_model import DraftModel
from splitfuse.worker.input_batch import RequestState, batch_order, prepare_inputs, update_states
from splitfuse.worker.model_on_device import ModelOnDevice

logger = logging.getLogger(__name__)

_PROMPT_LOGPROB_ROWS = 64  # prompt_logprobs: logits rows computed at a time


def accepted_drafts(drafts: list[int], drawn: list[int]) -> int:
    """How many drafts stand: draft j is kept while the token drawn before it (``drawn[j]``, from the target
    model at that position) is the draft itself. With a proposer that is sure of its drafts (n-gram), this
    is exact rejection sampling: draft d is accepted with probability p(d), and a rejection leaves a draw
    from p without d, renormalized — so the kept tokens, plus ``drawn[accepted]`` after them, are
    distributed exactly as drawing one token at a time. Greedy: the same tokens as without drafts."""
    accepted = 0
    while accepted < len(drafts) and drawn[accepted] == drafts[accepted]:
        accepted += 1
    return accepted


def grammar_masks(scheduler_output: SchedulerOutput, row_of: dict[str, int], vocab_size: int
                  ) -> Optional[GrammarMasks]:
    """Structured output: the step's bitmask rows as the sampler's masks (``row_of``: request id -> its first
    logit row; a request with drafts has a mask row per position, in order)."""
    request_ids = scheduler_output.grammar_request_ids
    if not request_ids:
        return None
    bitmask = np.frombuffer(scheduler_output.grammar_bitmask, dtype=np.int32).reshape(len(request_ids), -1)
    seen: dict[str, int] = {}  # a request's k-th mask row is for its k-th sampled position (drafts after the first)
    rows = []
    for request_id in request_ids:
        rows.append(row_of[request_id] + seen.get(request_id, 0))
        seen[request_id] = seen.get(request_id, 0) + 1
    return GrammarMasks(rows, torch.from_numpy(disallowed_tokens(bitmask, vocab_size)))


def profiling_batch(num_tokens: int, max_model_len: int, block_size: int
                    ) -> tuple[list[int], np.ndarray, BatchLayout]:
    """The largest step, for memory profiling: ``num_tokens`` prompt tokens as whole prompts of at most
    ``max_model_len`` (7 tokens, max 3 -> prompts of 3, 3, 1), every slot in block 0 (a one-block pool)."""
    length = max(1, min(num_tokens, max_model_len))
    query_lens = np.array([length] * (num_tokens // length) + ([num_tokens % length] if num_tokens % length else []),
                          dtype=np.int64)
    query_start_loc = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int64)
    positions = np.concatenate([np.arange(n) for n in query_lens]).astype(np.int64)
    layout = BatchLayout(query_lens=query_lens, context_lens=query_lens.copy(), query_start_loc=query_start_loc,
                         block_tables=np.zeros((len(query_lens), -(-length // block_size)), dtype=np.int64),
                         slot_mapping=torch.from_numpy(positions % block_size),
                         num_decodes=int(np.count_nonzero(query_lens == 1)), block_size=block_size)
    return [0] * num_tokens, positions, layout


class ModelRunner:
    def __init__(self, model_path: str, arch: ArchConfig, *, dtype: torch.dtype, device: torch.device,
                 num_blocks: Optional[int], block_size: int, eos_token_ids: frozenset[int], seed: int = 0,
                 attention_backend: str = "auto", max_num_batched_tokens: int = 0, max_num_seqs: int = 0,
                 batch_invariant: bool = False, draft_model_path: Optional[str] = None,
                 draft_arch: Optional[ArchConfig] = None, gpu_memory_utilization: float = 0.9,
                 enforce_eager: bool = False, max_model_len: Optional[int] = None) -> None:
        """``num_blocks`` None (CUDA only): the KV pool takes what the GPU has left after a profiling step."""
        self.arch = arch
        self.device = device
        self.block_size = block_size
        # Where a model runs and how its KV is held: the same for the target and a draft model.
        placement = dict(dtype=dtype, device=device, num_blocks=num_blocks or 1, block_size=block_size,
                         attention_backend=attention_backend, batch_invariant=batch_invariant)
        loaded = ModelOnDevice.load(model_path, arch, **placement)
        draft = None if draft_model_path is None else ModelOnDevice.load(draft_model_path, draft_arch, **placement)
        if num_blocks is None:
            num_blocks = self._profiled_num_blocks(loaded, draft, gpu_memory_utilization, max_num_batched_tokens,
                                                   max_num_seqs, max_model_len or arch.max_position_embeddings)
            for model in (loaded, draft):
                if model is not None:
                    model.resize_kv_pool(num_blocks)
        self.num_blocks = num_blocks
        self.platform, self.backend, self.model = loaded.platform, loaded.backend, loaded.model
        self.kv_store, self.sliding_windows = loaded.kv_store, loaded.sliding_windows
        self.sampler = Sampler(arch.vocab_size, eos_token_ids, seed=seed, argmax=self.platform.ops.argmax)
        self.requests: dict[str, RequestState] = {}
        # speculative_method="draft": the proposer, and the random stream of its verification (unseeded rows).
        self.draft_model = None if draft is None else DraftModel(
            draft, draft_arch.vocab_size, eos_token_ids=eos_token_ids, seed=seed,
            max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs)
        self.verify_generator = torch.Generator().manual_seed(seed + 2)
        # A step has at most max_num_batched_tokens tokens and samples for at most max_num_seqs requests.
        self.model.warm_up(max_num_batched_tokens, max_num_seqs)
        self.graphs: Optional[DecodeGraphs] = None
        if (device.type == "cuda" and not enforce_eager and getattr(self.backend, "graph_safe", False)
                and self.draft_model is None):
            self.graphs = self._capture_graphs(max_num_batched_tokens, max_num_seqs,
                                               max_model_len or arch.max_position_embeddings)

    def _profiled_num_blocks(self, target: ModelOnDevice, draft: Optional[ModelOnDevice], utilization: float,
                             max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> int:
        """KV blocks that fit what the GPU has left once the largest step has run (platforms/cuda/memory.py)."""
        if self.device.type != "cuda":
            raise ValueError("the KV pool is sized by profiling on CUDA only; give num_blocks on the CPU")

        def largest_step() -> None:
            with torch.inference_mode():
                token_ids, positions, layout = profiling_batch(max_num_batched_tokens, max_model_len,
                                                               self.block_size)
                layout.slot_mapping = layout.slot_mapping.to(self.device)
                hidden = target.model(torch.tensor(token_ids, device=self.device),
                                      torch.from_numpy(positions).to(self.device), target.kv_store.layers,
                                      target.backend.plan(layout, target.sliding_windows))
                target.model.compute_logits(hidden[:max(1, max_num_seqs)])

        peak, total = profile_peak_bytes(largest_step, self.device)
        bytes_per_block = sum(model.kv_store.bytes_per_block for model in (target, draft) if model is not None)
        num_blocks = kv_cache_bytes(total, utilization, peak) // bytes_per_block
        logger.info("GPU memory: %.1f GiB at utilization %.2f, peak %.1f GiB in a full step -> %d KV blocks",
                    total / (1 << 30), utilization, peak / (1 << 30), num_blocks)
        if num_blocks < 1:
            raise ValueError(f"the GPU has room for no KV block ({bytes_per_block} bytes each) after the model")
        return num_blocks

    def _capture_graphs(self, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> DecodeGraphs:
        model, kv_caches = self.model, self.kv_caches

        def forward(input_ids: torch.Tensor, positions: torch.Tensor, metadata: object) -> torch.Tensor:
            return model(input_ids, positions, kv_caches, metadata)

        sizes, max_blocks = capture_sizes(max_num_seqs), -(-max_model_len // self.block_size)
        # Every step's attention buffers, sized once: the graphs read them at fixed addresses.
        self.backend.reserve(max(max_num_batched_tokens, sizes[-1]), max(max_num_seqs, sizes[-1]), max_blocks,
                             self.arch.num_heads, self.arch.head_dim)
        graphs = DecodeGraphs(forward, self.backend, self.sliding_windows, sizes=sizes,
                              max_blocks_per_request=max_blocks, block_size=self.block_size, device=self.device,
                              num_splits=lambda size: self.backend.graph_num_splits(size, max_model_len))
        with torch.inference_mode():
            seconds = graphs.capture_all()
        logger.info("captured CUDA graphs of decode steps for batch sizes %s in %.1f s", graphs.sizes, seconds)
        return graphs

    @property
    def kv_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.kv_store.layers

    # -- the persistent batch ------------------------------------------------------------

    def apply_kv_operations(self, operations: list[KVOperation]) -> None:
        for operation in operations:
            if operation.kind != "copy":
                raise ValueError(f"KV operation {operation.kind!r} is not supported by this runner")
            self.kv_store.copy_blocks(operation.src_block_ids, operation.dst_block_ids)
            if self.draft_model is not None:  # the same slots hold the same positions in both pools
                self.draft_model.kv_store.copy_blocks(operation.src_block_ids, operation.dst_block_ids)

    # -- one step -------------------------------------------------------------------------

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """One forward over every scheduled token; samples for the scheduler's sampling requests."""
        update_states(self.requests, scheduler_output)
        if self.draft_model is not None:
            self.draft_model.update(scheduler_output)
        self.apply_kv_operations(scheduler_output.kv_operations)
        if scheduler_output.is_empty:
            return ModelRunnerOutput()
        scheduled = scheduler_output.num_scheduled_tokens
        states = [self.requests[request_id] for request_id in scheduled]
        counts = list(scheduled.values())
        order = batch_order(states, counts)
        states = [states[i] for i in order]
        query_lens = np.array([counts[i] for i in order], dtype=np.int64)
        spec = scheduler_output.spec_token_ids
        drafts = [spec.get(state.request_id, []) for state in states]
        draft_probs: dict[str, torch.Tensor] = {}  # the draft model's q per sampled (temperature > 0) request
        if self.draft_model is not None:  # its drafts come first: the target verifies them in this forward
            num_drafts = [scheduler_output.spec_num_drafts.get(state.request_id, 0) for state in states]
            drafts, draft_probs = self.draft_model.propose(states, query_lens - np.array(num_drafts), num_drafts)
        token_ids, positions, layout = prepare_inputs(states, query_lens, self.block_size, drafts)
        if self.graphs is not None and self.graphs.takes(layout):
            hidden = self.graphs.run(token_ids, positions, layout)
        else:
            hidden = self._forward(token_ids, positions, layout)

        prompt_logprobs = self._prompt_logprobs(states, query_lens, hidden, layout.query_start_loc)
        sampling_ids = set(scheduler_output.sampling_request_ids)
        rows = [i for i, state in enumerate(states) if state.request_id in sampling_ids]
        if not rows:
            return ModelRunnerOutput(prompt_logprobs=prompt_logprobs)
        # A request samples at its last token, and with drafts at each draft too (the tokens it verifies).
        sampling_states = [states[i] for i in rows]
        num_positions = [1 + len(drafts[i]) for i in rows]
        ends = layout.query_start_loc[1:][rows]
        logit_rows = np.concatenate([np.arange(end - n, end) for end, n in zip(ends, num_positions)])
        logits = self.model.compute_logits(hidden[torch.from_numpy(logit_rows).to(self.device)])
        first_row = np.cumsum([0] + num_positions[:-1]).tolist()
        masks = grammar_masks(scheduler_output, {s.request_id: r for s, r in zip(sampling_states, first_row)},
                              self.arch.vocab_size)
        sampling_rows = [SamplingRow(s.params, s.prompt_token_ids, s.output_token_ids + drafts[i][:j], s.generator)
                         for s, i, n in zip(sampling_states, rows, num_positions) for j in range(n)]
        sampled = self.sampler(logits, sampling_rows, masks)
        # A draft model's rows at temperature > 0 are verified apart; their draws above go unused.
        verified = self._verify_draft_model(sampling_states, first_row, num_positions, logits, sampling_rows,
                                            [drafts[i] for i in rows], draft_probs)
        token_ids, logprobs = [], []
        for r, (i, start, n) in enumerate(zip(rows, first_row, num_positions)):
            if r in verified:
                token_ids.append(verified[r][0])
                logprobs.append(verified[r][1])
                continue
            drawn = sampled.token_ids[start:start + n]
            kept = 1 + accepted_drafts(drafts[i], drawn)
            token_ids.append(drawn[:kept])
            row_logprobs = sampled.logprobs[start:start + kept]
            logprobs.append(None if row_logprobs[0] is None else row_logprobs)
        if self.draft_model is not None:
            for i, kept_tokens in zip(rows, token_ids):
                if drafts[i]:
                    self.draft_model.settle(states[i].request_id, len(drafts[i]), len(kept_tokens) - 1)
        return ModelRunnerOutput([s.request_id for s in sampling_states], token_ids, logprobs, prompt_logprobs)

    def _forward(self, token_ids: list[int], positions: np.ndarray, layout: BatchLayout) -> torch.Tensor:
        """The model run eagerly over the step's tokens (padded where the platform's matmuls want it)."""
        layout.slot_mapping = layout.slot_mapping.to(self.device)
        if self.model.pads_rows:  # dummy tokens (id 0 at position 0) up to a precompiled matmul size
            padding = padded_rows(len(token_ids)) - len(token_ids)
            token_ids.extend([0] * padding)
            positions = np.concatenate([positions, np.zeros(padding, dtype=positions.dtype)])
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        metadata = self.backend.plan(layout, self.sliding_windows)
        return self.model(input_ids, torch.from_numpy(positions).to(self.device), self.kv_caches, metadata)

    def _verify_draft_model(self, sampling_states: list[RequestState], first_row: list[int],
                            num_positions: list[int], logits: torch.Tensor, sampling_rows: list[SamplingRow],
                            drafts: list[list[int]], draft_probs: dict[str, torch.Tensor]) -> dict[int, tuple]:
        """The draft model's drafts at temperature > 0, by the general rule (``sample/rejection.py``): sampling
        row -> (kept tokens, their logprobs or None). Greedy drafts (q one-hot) need no more than
        ``accepted_drafts``, which gives the target's own argmax tokens."""
        general = [r for r, state in enumerate(sampling_states) if state.request_id in draft_probs]
        if not general:
            return {}
        logit_rows = [first_row[r] + j for r in general for j in range(num_positions[r])]
        target_probs = self.sampler.probabilities(logits[logit_rows], [sampling_rows[k] for k in logit_rows]).cpu()
        verified, offset = {}, 0
        for r in general:
            state, n = sampling_states[r], num_positions[r]
            kept = rejection_sample(target_probs[offset:offset + n], draft_probs[state.request_id], drafts[r],
                                    state.generator or self.verify_generator)
            offset += n
            row_logprobs = None
            if state.params.logprobs is not None:
                raw = logits[first_row[r]:first_row[r] + len(kept), :self.arch.vocab_size]
                row_logprobs = compute_logprobs(raw, torch.tensor(kept, device=raw.device),
                                                [state.params.logprobs] * len(kept))
            verified[r] = (kept, row_logprobs)
        return verified

    def _prompt_logprobs(self, states: list[RequestState], query_lens: np.ndarray, hidden: torch.Tensor,
                         query_start_loc: np.ndarray) -> dict[str, tuple[int, list]]:
        """For requests that asked: each prompt token this step's chunk predicts, scored from the logits at
        the position before it (a chunk at positions [s, e) scores prompt tokens s+1 .. min(e, P - 1))."""
        scored = {}
        for i, state in enumerate(states):
            num_top = state.params.prompt_logprobs
            start = state.num_computed_tokens
            end = min(start + int(query_lens[i]), len(state.prompt_token_ids) - 1)
            if num_top is None or end <= start:
                continue
            entries = []
            for chunk in range(start, end, _PROMPT_LOGPROB_ROWS):  # bounded memory: rows x vocab floats at a time
                stop = min(chunk + _PROMPT_LOGPROB_ROWS, end)
                first = int(query_start_loc[i]) + chunk - start
                logits = self.model.compute_logits(hidden[first:first + stop - chunk])[:, :self.arch.vocab_size]
                targets = torch.tensor(state.prompt_token_ids[chunk + 1:stop + 1], device=logits.device)
                entries += compute_logprobs(logits, targets, [num_top] * (stop - chunk))
            scored[state.request_id] = (start + 1, entries)
        return scored
