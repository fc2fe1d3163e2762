"""InputProcessor: a user's prompt and SamplingParams -> validated ``EngineCoreRequest``s (one per choice).

The frontend half of admission: tokenizing, vocabulary and context-length checks, resolving
max_tokens, fanning ``n`` (or ``best_of``) out into a leader and its siblings. The core's own
checks (duplicate ids, waiting-queue limits) happen when it takes the requests.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from splitfuse.clock import Clock, WallClock
from splitfuse.engine.protocol import EngineCoreRequest
from splitfuse.sampling_params import SamplingParams

PromptType = Union[str, list[int]]


def prompt_too_long_message(num_prompt_tokens: int, max_model_len: int) -> str:
    return (f"prompt has {num_prompt_tokens} tokens, but the model's context length (max_model_len) "
            f"is {max_model_len}")


def check_fits_cache(num_tokens: int, max_num_tokens_in_cache: Optional[int]) -> None:
    """A request that could never fit the whole KV pool is refused (None: the pool is sized in the core,
    after memory profiling on CUDA, and the core checks)."""
    if max_num_tokens_in_cache is not None and num_tokens > max_num_tokens_in_cache:
        raise ValueError(f"request needs up to {num_tokens} tokens of KV cache, "
                         f"but the whole cache holds {max_num_tokens_in_cache}")


class InputProcessor:
    def __init__(self, tokenizer: Any, *, vocab_size: int, max_model_len: int, max_num_tokens_in_cache: Optional[int],
                 clock: Optional[Clock] = None) -> None:
        self.tokenizer = tokenizer
        self.clock = clock or WallClock()
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_num_tokens_in_cache = max_num_tokens_in_cache

    def encode_prompt(self, prompt: PromptType) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return self.tokenizer.encode(prompt)
        token_ids = list(prompt)
        if not token_ids:
            raise ValueError("prompt is empty")
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary (size {self.vocab_size})")
        return token_ids

    def resolve_max_tokens(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        """max_tokens as given, or all the context left; raises if the request cannot fit."""
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(prompt_too_long_message(num_prompt_tokens, self.max_model_len))
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - num_prompt_tokens
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
                             f"{num_prompt_tokens + max_tokens} exceeds the model's context length "
                             f"(max_model_len) of {self.max_model_len}")
        check_fits_cache(num_prompt_tokens + max_tokens, self.max_num_tokens_in_cache)
        return max_tokens

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams,
                arrival_time: Optional[float] = None, priority: int = 0,
                tenant: Optional[str] = None) -> tuple[list[int], list[EngineCoreRequest]]:
        """(prompt token ids, the core requests): ``request_id`` itself for one sequence, else ``request_id#i``.

        ``best_of`` > n: ``best_of`` sequences, each with at least the chosen token's logprob
        (``logprobs=0``), which the output processor ranks them by.
        """
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate_for_vocab(self.vocab_size)
        if params.structured_outputs is not None:
            from splitfuse.sample.grammar import check

            check(params.structured_outputs)  # a bad schema or grammar fails here, before anything is queued
        prompt_token_ids = self.encode_prompt(prompt)
        max_tokens = self.resolve_max_tokens(len(prompt_token_ids), params)
        arrival_time = self.clock.now() if arrival_time is None else arrival_time
        num_sequences = params.num_sequences
        ids = [request_id] if num_sequences == 1 else [f"{request_id}#{i}" for i in range(num_sequences)]
        core_params = params
        if num_sequences > params.n and params.logprobs is None:
            core_params = params.clone(logprobs=0)
        requests = [EngineCoreRequest(
            sequence_id, prompt_token_ids, core_params, arrival_time, max_tokens, priority, tenant,
            seed=None if params.seed is None else params.seed + index,
            prefill_leader_id=ids[0] if index else None) for index, sequence_id in enumerate(ids)]
        return prompt_token_ids, requests
