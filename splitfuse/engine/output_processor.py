"""OutputProcessor: the frontend half of output handling — detokenize, stop strings, logprob text, n grouping.

It turns each step's ``EngineCoreOutputs`` (token ids only) into ``RequestOutput``s, with
work proportional to the new tokens: each sequence's lists grow in place, a DELTA output
carries only what is new, a FINAL_ONLY request builds one output at the end. A stop string
ends a sequence here; ``process`` returns its id so the caller aborts it in the core.
A ``best_of`` request has one output, at the end: its ``n`` sequences of the highest
cumulative logprob, indexed 0..n-1 in that order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from splitfuse.engine.detokenizer import IncrementalDetokenizer, StopStrings
from splitfuse.engine.protocol import EngineCoreOutput, EngineCoreOutputs
from splitfuse.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, RequestOutputKind
from splitfuse.sampling_params import SamplingParams
from splitfuse.step import TokenLogprobs


@dataclass
class _Sequence:
    """One of a request's ``n`` (or ``best_of``) sequences (its core request id is ``sequence_id``)."""

    sequence_id: str
    index: int
    params: SamplingParams
    detokenizer: Optional[IncrementalDetokenizer]
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list[dict[int, Logprob]]] = None  # None: the user asked for none
    cumulative_logprob: Optional[float] = None  # None: neither asked for nor ranked by (best_of)
    finish_reason: Optional[str] = None
    stop_reason: Optional[int | str] = None
    num_sent_tokens: int = 0  # DELTA: tokens already handed out

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Group:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    output_kind: RequestOutputKind
    sequences: list[_Sequence]
    metrics: RequestMetrics
    num_returned: int  # n; fewer than len(sequences) for best_of
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = None  # None first: the first token has none

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.sequences)

    @property
    def picks_best(self) -> bool:
        return self.num_returned < len(self.sequences)


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    sequences_to_abort: list[str]  # ended by a stop string here; the core still runs them


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._groups: dict[str, _Group] = {}
        self._sequences: dict[str, tuple[_Group, _Sequence]] = {}  # core request id -> its group and sequence

    def add_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                    params: SamplingParams, sequence_ids: list[str], arrival_time: float,
                    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> None:
        sequences = []
        wants_logprobs = params.logprobs is not None
        ranked = len(sequence_ids) > params.n  # best_of: ranked by cumulative logprob even without logprobs
        detokenizes = params.detokenize and self.tokenizer is not None
        stop_strings = StopStrings(params.stop_strings) if detokenizes and params.stop_strings else None
        for index, sequence_id in enumerate(sequence_ids):
            detokenizer = (IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params, stop_strings)
                           if detokenizes else None)
            sequences.append(_Sequence(sequence_id, index, params, detokenizer,
                                       logprobs=[] if wants_logprobs else None,
                                       cumulative_logprob=0.0 if wants_logprobs or ranked else None))
        group = _Group(request_id, prompt, prompt_token_ids, output_kind, sequences,
                       RequestMetrics(arrival_time=arrival_time, num_prompt_tokens=len(prompt_token_ids)),
                       num_returned=min(params.n, len(sequences)))
        self._groups[request_id] = group
        for sequence in sequences:
            self._sequences[sequence.sequence_id] = (group, sequence)

    def remove_request(self, request_id: str) -> list[str]:
        """Forgets a request (aborted by its caller); returns its sequences' core ids."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return []
        for sequence in group.sequences:
            self._sequences.pop(sequence.sequence_id, None)
        return [s.sequence_id for s in group.sequences]

    def has_request(self, request_id: str) -> bool:
        return request_id in self._groups

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    def process(self, core_outputs: EngineCoreOutputs) -> ProcessedOutputs:
        now = core_outputs.timestamp
        changed: dict[str, _Group] = {}
        to_abort: list[str] = []
        for output in core_outputs.outputs:
            entry = self._sequences.get(output.request_id)
            if entry is None:
                continue  # aborted after the core had stepped it
            group, sequence = entry
            if sequence.finished:
                continue
            self._update_sequence(group, sequence, output, now)
            if sequence.finish_reason is not None and output.finish_reason is None:
                to_abort.append(sequence.sequence_id)
            changed[group.request_id] = group
        request_outputs = []
        for group in changed.values():
            request_output = self._make_output(group, now)
            if request_output is not None:
                request_outputs.append(request_output)
        return ProcessedOutputs(request_outputs, to_abort)

    def _update_sequence(self, group: _Group, sequence: _Sequence, output: EngineCoreOutput, now: float) -> None:
        metrics = group.metrics
        if output.first_scheduled_time is not None and metrics.first_scheduled_time is None:
            metrics.first_scheduled_time = output.first_scheduled_time
        if output.new_token_ids and metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.num_cached_tokens = max(metrics.num_cached_tokens, output.num_cached_tokens)
        if output.prompt_logprobs is not None:
            prompt = group.prompt_token_ids
            group.prompt_logprobs = [None] + [self._entries(prompt[position], scored)
                                              for position, scored in enumerate(output.prompt_logprobs, start=1)]
        token_ids = output.new_token_ids
        params = sequence.params
        # A token that ends the request in the core (EOS, a stop token) stays in token_ids, not in the text.
        num_to_decode = len(token_ids) - (1 if output.finish_reason == "stop" else 0)
        for position, token_id in enumerate(token_ids):
            sequence.token_ids.append(token_id)
            if output.new_logprobs is not None and sequence.cumulative_logprob is not None:
                sequence.cumulative_logprob += output.new_logprobs[position][0]  # the chosen token's
                if sequence.logprobs is not None:
                    self._append_logprobs(sequence, token_id, output.new_logprobs[position])
            if position < num_to_decode and sequence.detokenizer is not None:
                stop_string = sequence.detokenizer.update([token_id])
                if stop_string is not None:  # the detokenizer looks for stops once min_tokens are out
                    sequence.finish_reason, sequence.stop_reason = "stop", stop_string
                    return  # the sequence ends at this token; any later ones of this step are dropped
        if output.finish_reason is not None:
            sequence.finish_reason, sequence.stop_reason = output.finish_reason, output.stop_reason

    def _append_logprobs(self, sequence: _Sequence, token_id: int, logprobs: TokenLogprobs) -> None:
        sequence.logprobs.append(self._entries(token_id, logprobs))

    def _entries(self, token_id: int, logprobs: TokenLogprobs) -> dict[int, Logprob]:
        """One position's logprobs: the token's own first, then the top ones (ranks from 1)."""
        chosen_logprob, chosen_rank, top_ids, top_logprobs = logprobs
        decode = self.tokenizer.decode if self.tokenizer is not None else (lambda ids: None)
        entries = {tid: Logprob(lp, rank + 1, decode([tid]))
                   for rank, (tid, lp) in enumerate(zip(top_ids, top_logprobs))}
        entries.setdefault(token_id, Logprob(chosen_logprob, chosen_rank, decode([token_id])))
        return {token_id: entries.pop(token_id), **entries}

    def _make_output(self, group: _Group, now: float) -> Optional[RequestOutput]:
        finished = group.finished
        kind = group.output_kind
        if (kind == RequestOutputKind.FINAL_ONLY or group.picks_best) and not finished:
            return None
        if group.picks_best:
            completions = self._best_completions(group, kind)
        else:
            completions = [self._completion(sequence, kind) for sequence in group.sequences]
        if finished:
            group.metrics.finished_time = now
            self.remove_request(group.request_id)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, completions, finished,
                             group.metrics, num_cached_tokens=group.metrics.num_cached_tokens,
                             prompt_logprobs=group.prompt_logprobs)

    def _best_completions(self, group: _Group, kind: RequestOutputKind) -> list[CompletionOutput]:
        """best_of: the n sequences of the highest cumulative logprob (ties: the lower index), as 0..n-1.

        What the others generated is counted in ``num_discarded_tokens`` (usage bills it).
        """
        ranked = sorted(group.sequences, key=lambda s: -s.cumulative_logprob)  # stable: ties keep index order
        best, rest = ranked[:group.num_returned], ranked[group.num_returned:]
        group.metrics.num_discarded_tokens = sum(len(s.token_ids) for s in rest)
        wants_logprobs = group.sequences[0].params.logprobs is not None
        return [dataclasses.replace(self._completion(sequence, kind), index=index,
                                    cumulative_logprob=sequence.cumulative_logprob if wants_logprobs else None)
                for index, sequence in enumerate(best)]

    @staticmethod
    def _completion(sequence: _Sequence, kind: RequestOutputKind) -> CompletionOutput:
        detokenizer = sequence.detokenizer
        if kind == RequestOutputKind.DELTA:
            start, sequence.num_sent_tokens = sequence.num_sent_tokens, len(sequence.token_ids)
            text = detokenizer.get_next_output_text(sequence.finished, delta=True) if detokenizer else ""
            token_ids = sequence.token_ids[start:]
            logprobs = None if sequence.logprobs is None else sequence.logprobs[start:]
        else:
            text = detokenizer.output_text if detokenizer is not None else ""
            token_ids, logprobs = sequence.token_ids, sequence.logprobs
        return CompletionOutput(index=sequence.index, text=text, token_ids=token_ids, logprobs=logprobs,
                                cumulative_logprob=sequence.cumulative_logprob,
                                finish_reason=sequence.finish_reason, stop_reason=sequence.stop_reason)
