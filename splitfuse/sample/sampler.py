"""Sampler: one step's logits [num_rows, vocab] -> one token (and optional logprobs) per row.

Order of processing, as vLLM does it: a grammar's mask first (structured output: tokens it does
not allow get -inf, on every path, so logprobs see it too); logprobs are read from those logits; then
logit_bias -> min_tokens -> repetition penalty -> frequency/presence penalties ->
greedy rows take argmax -> temperature -> top-k -> top-p -> min-p -> sample.
Every stage is a tensor op over all rows that need it and is skipped when none does.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Callable, Iterable, Optional

import torch

from splitfuse.platforms.ops import torch_argmax
from splitfuse.sampling_params import SamplingParams

# (chosen token's logprob, its 1-based rank, top-k token ids, top-k logprobs) with k = params.logprobs
RowLogprobs = tuple[float, int, list[int], list[float]]

# Temperatures this small are treated as greedy: dividing by them overflows fp32 logits.
_MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingRow:
    """One row of logits = one sequence that samples this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens generated so far (before this step)
    # Set iff params.seed is not None; owned by the request and advanced across steps.
    # It may live on any device: its noise is drawn there and copied to the logits' device.
    generator: Optional[torch.Generator] = None


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[Optional[RowLogprobs]]  # one per row; None where params.logprobs is None


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < _MIN_TEMPERATURE


def _has_penalties(params: SamplingParams) -> bool:
    return (params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0)


def _in_min_tokens(row: SamplingRow) -> bool:
    return len(row.output_token_ids) < row.params.min_tokens


def token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab_size] int64 counts of each token id in each list.

    One flat tensor and one bincount instead of a per-row loop:
    [[2, 2], [0]] with vocab 3 -> keys [2, 2, 3] -> [[0, 0, 2], [1, 0, 0]].
    """
    lengths = torch.tensor([len(tokens) for tokens in token_lists], device=device)
    flat = torch.tensor(list(chain.from_iterable(token_lists)), dtype=torch.long, device=device)
    row_of_token = torch.repeat_interleave(torch.arange(len(token_lists), device=device), lengths)
    keys = row_of_token * vocab_size + flat
    return torch.bincount(keys, minlength=len(token_lists) * vocab_size).view(len(token_lists), vocab_size)


@dataclass
class GrammarMasks:
    """Structured output's masks for one step: ``disallowed[j]`` (bool, [vocab]) are the tokens row
    ``rows[j]``'s grammar does not allow now."""

    rows: list[int]
    disallowed: torch.Tensor


def apply_grammar_masks(logits: torch.Tensor, masks: Optional[GrammarMasks]) -> None:
    """Sets every token a row's grammar does not allow now to -inf, in place."""
    if masks is None or not masks.rows:
        return
    disallowed = masks.disallowed[:, :logits.shape[1]].to(logits.device)
    if masks.rows == list(range(logits.shape[0])):  # every row constrained: one fill, no gather
        logits.masked_fill_(disallowed, float("-inf"))
        return
    index = torch.tensor(masks.rows, device=logits.device)
    logits[index] = logits[index].masked_fill_(disallowed, float("-inf"))


def apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Adds each row's logit_bias in place."""
    entries = [(i, token_id, bias) for i, row in enumerate(rows) if row.params.logit_bias
               for token_id, bias in row.params.logit_bias.items()]
    if not entries:
        return
    row_ids, token_ids, biases = zip(*entries)
    index = (torch.tensor(row_ids, device=logits.device), torch.tensor(token_ids, device=logits.device))
    logits.index_put_(index, torch.tensor(biases, dtype=logits.dtype, device=logits.device), accumulate=True)


def apply_min_tokens(logits: torch.Tensor, rows: list[SamplingRow], eos_token_ids: list[int]) -> None:
    """Bans eos (even with ignore_eos) and the row's stop_token_ids until min_tokens are generated."""
    entries = [(i, token_id) for i, row in enumerate(rows) if _in_min_tokens(row)
               for token_id in chain(eos_token_ids, row.params.stop_token_ids)]
    if not entries:
        return
    row_ids, token_ids = zip(*entries)
    index = (torch.tensor(row_ids, device=logits.device), torch.tensor(token_ids, device=logits.device))
    logits.index_put_(index, torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Repetition penalty (HF/vLLM: over prompt and output tokens), then frequency and
    presence penalties (OpenAI: over output tokens only), in place, on rows that ask.

    Repetition 2.0 on a seen token: logit 3.0 -> 1.5, logit -3.0 -> -6.0.
    Frequency 0.5 + presence 1.0 on a token generated twice: logit -= 0.5 * 2 + 1.0.
    """
    row_ids = [i for i, row in enumerate(rows) if _has_penalties(row.params)]
    if not row_ids:
        return
    device, vocab_size = logits.device, logits.shape[1]
    penalized_rows = [rows[i] for i in row_ids]
    params = [row.params for row in penalized_rows]
    sub = logits[row_ids]
    output_counts = token_counts([row.output_token_ids for row in penalized_rows], vocab_size, device)

    if any(p.repetition_penalty != 1.0 for p in params):
        prompt_counts = token_counts([row.prompt_token_ids for row in penalized_rows], vocab_size, device)
        seen = (prompt_counts > 0) | (output_counts > 0)
        repetition = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)
        sub = torch.where(seen, torch.where(sub > 0, sub / repetition, sub * repetition), sub)

    if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device).unsqueeze(1)
        presence = torch.tensor([p.presence_penalty for p in params], device=device).unsqueeze(1)
        sub = sub - frequency * output_counts - presence * (output_counts > 0)

    logits[row_ids] = sub


def _kth_largest(sorted_desc: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """[rows, 1] value of the k-th largest logit; -inf where top_k == 0 (no top-k)."""
    kth = sorted_desc.gather(1, (top_k - 1).clamp(min=0).unsqueeze(1))
    return kth.masked_fill((top_k == 0).unsqueeze(1), float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: Optional[list[int]],
                      top_p: Optional[list[float]]) -> None:
    """Sets to -inf every logit outside the row's top-k and top-p set, in place.

    top_k: one per row, 0 = off (values past the vocab size act as off); None = no row.
    top_p: one per row, 1.0 = off; None = no row.
    Ties at a boundary are kept; only strictly lower logits are cut. top-p keeps the
    smallest prefix (by probability) whose mass reaches top_p:
    probs [0.5, 0.3, 0.2], top_p 0.7 -> mass before each [0, 0.5, 0.8] -> keep 2.
    """
    device, vocab_size = logits.device, logits.shape[1]
    if top_k is not None and max(top_k, default=0) == 0:
        top_k = None
    if top_k is None and top_p is None:
        return
    if top_k is not None:
        top_k = [min(k, vocab_size) for k in top_k]
        top_k_tensor = torch.tensor(top_k, device=device)
    if top_p is None:
        # top-k alone needs only the largest max(k) values, not a full sort.
        kth = _kth_largest(logits.topk(max(top_k), dim=-1).values, top_k_tensor)
        logits.masked_fill_(logits < kth, float("-inf"))
        return
    top_p_tensor = torch.tensor(top_p, dtype=torch.float32, device=device)
    sorted_desc = logits.sort(dim=-1, descending=True).values
    if top_k is not None:
        kth = _kth_largest(sorted_desc, top_k_tensor)
        logits.masked_fill_(logits < kth, float("-inf"))
        sorted_desc.masked_fill_(sorted_desc < kth, float("-inf"))
    sorted_probs = sorted_desc.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # Rows with top_p == 1 keep all: fp32 cumsum can reach 1.0 before the tail ends.
    keep = (mass_before < top_p_tensor.unsqueeze(1)) | (top_p_tensor >= 1.0).unsqueeze(1)
    num_keep = keep.sum(dim=-1).clamp(min=1)
    cut = sorted_desc.gather(1, (num_keep - 1).unsqueeze(1))
    logits.masked_fill_(logits < cut, float("-inf"))


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> None:
    """Zeroes probabilities below min_p * (the row's largest probability), in place."""
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    probs.masked_fill_(probs < threshold, 0.0)


def compute_logprobs(raw_logits: torch.Tensor, token_ids: torch.Tensor,
                     num_top: list[int]) -> list[RowLogprobs]:
    """Logprob and rank of each chosen token plus each row's top num_top[i], from raw logits."""
    logprobs = torch.log_softmax(raw_logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_values, top_ids = logprobs.topk(max(num_top), dim=-1)
    chosen_list, rank_list = chosen.squeeze(1).tolist(), ranks.tolist()
    top_value_list, top_id_list = top_values.tolist(), top_ids.tolist()
    return [(chosen_list[i], rank_list[i], top_id_list[i][:k], top_value_list[i][:k])
            for i, k in enumerate(num_top)]


class Sampler:
    """Samples one token per row. Rows with a generator draw noise only from it, so a
    seeded request gets the same tokens whatever else is in the batch; other rows share
    one batch-wide generator seeded from ``seed``.

    ``argmax``: greedy rows' pick, the first index on ties (as vLLM and transformers pick): the
    platform's ``ops.argmax`` (the C kernel reads bf16 logits without an fp32 copy); None: torch's.
    """

    def __init__(self, vocab_size: int, eos_token_ids: Iterable[int], seed: int = 0,
                 argmax: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.seed = seed
        self._argmax = argmax or torch_argmax
        self._batch_generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow],
                 grammar_masks: Optional[GrammarMasks] = None) -> SamplerOutput:
        assert logits.shape[0] == len(rows), f"{logits.shape[0]} logit rows for {len(rows)} sampling rows"
        # Logit columns past the model's vocab are padding and never sampled.
        raw = logits[:, :min(self.vocab_size, logits.shape[1])]
        apply_grammar_masks(raw, grammar_masks)  # in place: the runner's logits are this step's own
        params = [row.params for row in rows]
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        sample_rows = [i for i, p in enumerate(params) if not is_greedy(p)]
        changes_logits = any(p.logit_bias or _has_penalties(p) for p in params)
        if not sample_rows and not changes_logits:
            # All greedy, at most min_tokens' bans to apply: argmax of the raw logits without a copy.
            token_ids = self._greedy_with_bans(raw, rows)
            return SamplerOutput(token_ids.tolist(), self._logprobs(raw, token_ids, params, logprob_rows))

        needs_processing = changes_logits or any(_in_min_tokens(row) for row in rows)
        work = raw.to(torch.float32, copy=True)
        if needs_processing:
            apply_logit_bias(work, rows)
            apply_min_tokens(work, rows, self.eos_token_ids)
            apply_penalties(work, rows)
        if len(sample_rows) == len(rows):
            token_ids = self._sample(work, rows)
        else:
            token_ids = work.max(dim=-1).indices  # as argmax (first index on ties), faster on CPU
            if sample_rows:
                token_ids[sample_rows] = self._sample(work[sample_rows], [rows[i] for i in sample_rows])

        return SamplerOutput(token_ids.tolist(), self._logprobs(raw, token_ids, params, logprob_rows))

    def _greedy_with_bans(self, raw: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """argmax per row with min_tokens' bans: a row's pick only changes if the pick itself is banned."""
        token_ids = self._argmax(raw)
        banned_rows = [i for i, row in enumerate(rows) if _in_min_tokens(row)]
        if banned_rows:
            picks = token_ids[banned_rows].tolist()
            redo = [i for i, pick in zip(banned_rows, picks)
                    if pick in self.eos_token_ids or pick in rows[i].params.stop_token_ids]
            if redo:
                work = raw[redo].clone()
                apply_min_tokens(work, [rows[i] for i in redo], self.eos_token_ids)
                token_ids[redo] = self._argmax(work)
        return token_ids

    @staticmethod
    def _logprobs(raw: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams],
                  logprob_rows: list[int]) -> list[Optional[RowLogprobs]]:
        logprobs: list[Optional[RowLogprobs]] = [None] * len(params)
        if logprob_rows:
            computed = compute_logprobs(raw[logprob_rows], token_ids[logprob_rows],
                                        [params[i].logprobs for i in logprob_rows])
            for i, row_logprobs in zip(logprob_rows, computed):
                logprobs[i] = row_logprobs
        return logprobs

    def probabilities(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """[rows, vocab] fp32: the distribution each row's draw is made from (logit bias, min_tokens,
        penalties, temperature, top-k, top-p, min-p; greedy rows: one-hot at their pick), normalized.
        What speculative decoding's rejection sampler compares (``sample/rejection.py``); no grammar."""
        work = logits[:, :min(self.vocab_size, logits.shape[1])].to(torch.float32, copy=True)
        apply_logit_bias(work, rows)
        apply_min_tokens(work, rows, self.eos_token_ids)
        apply_penalties(work, rows)
        probs = torch.zeros_like(work)
        greedy = [i for i, row in enumerate(rows) if is_greedy(row.params)]
        if greedy:
            picks = work[greedy].max(dim=-1).indices  # first index on ties, as the greedy path
            probs[torch.tensor(greedy, device=work.device), picks] = 1.0
        sampled = [i for i, row in enumerate(rows) if not is_greedy(row.params)]
        if sampled:
            row_probs = self._probs(work[sampled], [rows[i] for i in sampled])
            probs[sampled] = row_probs / row_probs.sum(dim=-1, keepdim=True)
        return probs

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then one draw per row; modifies ``logits``."""
        probs = self._probs(logits, rows)
        # Exponential race: argmax(p / E), E ~ Exp(1), is a draw from p (scale-free, so no
        # renormalising after masks); masked tokens have p == 0 and can never win.
        return probs.div_(self._noise(probs, rows)).argmax(dim=-1)

    def _probs(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Temperature, top-k, top-p, softmax, min-p (not renormalized); modifies ``logits``."""
        device, vocab_size = logits.device, logits.shape[1]
        params = [row.params for row in rows]
        if any(p.temperature != 1.0 for p in params):
            logits.div_(torch.tensor([p.temperature for p in params], device=device).unsqueeze(1))

        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        use_top_k = any(0 < k < vocab_size for k in top_k)
        use_top_p = any(p < 1.0 for p in top_p)
        if use_top_k or use_top_p:
            apply_top_k_top_p(logits, top_k if use_top_k else None, top_p if use_top_p else None)
        probs = logits.softmax(dim=-1)
        if any(p.min_p > 0.0 for p in params):
            apply_min_p(probs, torch.tensor([p.min_p for p in params], device=device))
        return probs

    def _noise(self, probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        noise = torch.empty_like(probs)
        seeded = [i for i, row in enumerate(rows) if row.generator is not None]
        if len(seeded) < len(rows):
            noise.exponential_(generator=self._batch_generator(probs.device))
        for i in seeded:  # per-row loop: a seeded row must consume only its own generator
            generator = rows[i].generator
            row_noise = torch.empty(probs.shape[1], device=generator.device).exponential_(generator=generator)
            noise[i] = row_noise.to(probs.device)
        # Exp(1) can return 0; p / 0 would be inf or nan and beat every real token.
        return noise.clamp_min_(torch.finfo(torch.float32).tiny)

    def _batch_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._batch_generators:
            self._batch_generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._batch_generators[device]
