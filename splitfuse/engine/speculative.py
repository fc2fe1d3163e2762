"""Speculative decoding's scheduler half: how many draft tokens a request gets this step, and which (n-gram).

``ngram_draft`` is prompt lookup: the longest suffix of the request's tokens (``prompt_lookup_max``
down to ``prompt_lookup_min`` tokens) that occurred before; its most recent earlier occurrence's
continuation is the draft. [5, 6, 7, 9, 5, 6] with n = 2 -> "5 6" occurred at 0 -> draft [7, 9, 5].

How many drafts (``Speculator.drafts``): under a grammar, n-gram drafts up to the first it does not allow
(a draft model's: none); none while more than
``speculative_max_batch`` requests run (a compute-bound batch pays for every draft token: SmartSpec),
and per request as many as its recent acceptance rate earns (an exponential moving average; a request
whose drafts keep failing stops getting them and is tried again later). Draft tokens cost budget like
any token; the runner verifies them in the same forward (``worker/model_runner.py``). With a draft model
(``speculative_method="draft"``) the scheduler decides only how many; the runner's draft model
(``worker/draft_model.py``) proposes the tokens.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from typing import Optional

from splitfuse.config import SchedulerConfig
from splitfuse.engine.request import Request

_EMA_WEIGHT = 0.3  # weight of the latest step in the acceptance average
_OFF_BELOW = 0.15  # acceptance under this: no drafts ...
_RECOVERY = 0.02  # ... and the average creeps back up by this each step without them


def ngram_draft(tokens: list[int], num_drafts: int, n_max: int, n_min: int) -> list[int]:
    """Up to ``num_drafts`` tokens that followed the latest earlier occurrence of the longest repeated suffix."""
    length = len(tokens)
    if num_drafts < 1 or length < n_min + 1:
        return []
    data = array("i", tokens).tobytes()  # a C-speed search over 4-byte tokens
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        pattern = data[-4 * n:]
        end = 4 * (length - 1)  # the occurrence must start before the suffix itself
        while True:
            found = data.rfind(pattern, 0, end)
            if found < 0:
                break
            if found % 4 == 0:
                start = found // 4 + n
                return tokens[start:start + num_drafts]
            end = found + len(pattern) - 1  # a match across token boundaries: look further back
    return []


@dataclass
class SpeculationStats:
    draft_tokens: int = 0
    accepted_tokens: int = 0
    steps: int = 0  # request-steps that carried drafts

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


class Speculator:
    def __init__(self, config: SchedulerConfig, max_model_len: Optional[int]) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.stats = SpeculationStats()

    def drafts(self, request: Request, budget: int, num_running: int) -> tuple[int, list[int]]:
        """This step's drafts for a request that decodes (one known token left to compute): how many, and
        their tokens (n-gram), or no tokens (a draft model: the runner proposes that many)."""
        config = self.config
        if request.grammar_future is not None or num_running > config.speculative_max_batch:
            return 0, []
        if request.matcher is not None and config.speculative_method != "ngram":
            return 0, []  # a draft model drafts without the grammar
        if request.spec_acceptance < _OFF_BELOW:
            request.spec_acceptance += _RECOVERY
            return 0, []
        room = min(budget, request.max_tokens - request.num_output_tokens - 1)
        if self.max_model_len is not None:
            room = min(room, self.max_model_len - request.num_tokens)
        wanted = min(room, max(1, math.ceil(config.num_speculative_tokens * request.spec_acceptance)))
        if config.speculative_method == "draft":
            return max(wanted, 0), []
        draft_ids = ngram_draft(request.all_token_ids, wanted, config.prompt_lookup_max, config.prompt_lookup_min)
        if request.matcher is not None:  # under a grammar: only the drafts it allows (their masks follow them)
            draft_ids = draft_ids[:request.matcher.validate_tokens(draft_ids)]
        return len(draft_ids), draft_ids

    def record(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        request.spec_acceptance = (1 - _EMA_WEIGHT) * request.spec_acceptance + _EMA_WEIGHT * num_accepted / num_drafts
        self.stats.draft_tokens += num_drafts
        self.stats.accepted_tokens += num_accepted
        self.stats.steps += 1
