"""SamplingParams: how one request picks its tokens and when it stops; validated on creation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Union

_MAX_LOGPROBS = 20


@dataclass
class StructuredOutputsParams:
    """The one constraint a request's output must obey (vLLM's ``structured_outputs``), exactly one of:

    ``json``: a JSON schema (a dict or its text); ``json_object``: any JSON object; ``regex``: the whole
    output matches it; ``choice``: the output is one of these strings; ``grammar``: a Lark or GBNF
    (llama.cpp) grammar. Whether a schema or grammar is valid is checked where it is compiled
    (``splitfuse/sample/grammar.py``); here only the shape.
    """

    json: Union[str, dict[str, Any], None] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("structured output takes exactly one of json, regex, choice, grammar or json_object; "
                             f"got {', '.join(given) or 'none'}")
        if isinstance(self.json, dict):
            self.json = json.dumps(self.json)  # the compile cache's key (key order kept: it is the output's order)
        if self.json is not None and not isinstance(self.json, str):
            raise ValueError(f"a JSON schema must be an object, got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured output {name} must be a non-empty string, got {value!r}")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError(f"structured output choice must be a non-empty list of non-empty strings, "
                             f"got {self.choice!r}")

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): what is compiled, and what the compiled grammar is cached by."""
        if self.json_object:
            return ("json_object", "")
        if self.choice is not None:
            return ("choice", json.dumps(self.choice))
        kind = next(name for name in ("json", "regex", "grammar") if getattr(self, name) is not None)
        return (kind, getattr(self, kind))


@dataclass
class SamplingParams:
    """Per-request sampling knobs, with the meanings vLLM and the OpenAI API give them.

    ``temperature == 0`` means greedy. ``logprobs=k`` returns the chosen token's
    log-probability plus the top ``k`` (log-softmax of the raw model logits).
    ``best_of``: generate this many sequences and return the ``n`` with the highest cumulative
    logprob (None: ``n``; seeded, sequence ``i`` uses ``seed + i``, so the pick is reproducible).
    A bad value raises ``ValueError`` naming the field.
    """

    n: int = 1
    best_of: Optional[int] = None
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[int, float]] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    structured_outputs: Optional[StructuredOutputsParams] = None
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self._stop_list = [self.stop]
        else:
            self._stop_list = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self._validate()

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    @property
    def num_sequences(self) -> int:
        """Sequences generated for one prompt: ``best_of`` of them, of which ``n`` are returned."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def _validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        check(self.best_of is None or (isinstance(self.best_of, int) and self.best_of >= self.n),
              f"best_of must be an integer >= n ({self.n}), got {self.best_of!r}")
        check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
              f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0,
              f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
              f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        check(0.0 <= self.temperature <= 100.0, f"temperature must be in [0, 100], got {self.temperature!r}")
        check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p!r}")
        check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be -1, 0 or >= 1, got {self.top_k!r}")
        check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p!r}")
        check(0.0 < self.repetition_penalty <= 100.0,
              f"repetition_penalty must be in (0, 100], got {self.repetition_penalty!r}")
        check(-2.0 <= self.presence_penalty <= 2.0,
              f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        check(-2.0 <= self.frequency_penalty <= 2.0,
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        check(self.seed is None or (isinstance(self.seed, int) and -(1 << 63) <= self.seed < (1 << 63)),
              f"seed must be a signed 64-bit integer, got {self.seed!r}")
        for name, value in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)):
            check(value is None or (isinstance(value, int) and 0 <= value <= _MAX_LOGPROBS),
                  f"{name} must be an integer in [0, {_MAX_LOGPROBS}], got {value!r}")
        check(all(isinstance(s, str) and s for s in self._stop_list), "stop strings must be non-empty strings")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
              f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.logit_bias:
            check(all(-100.0 <= v <= 100.0 for v in self.logit_bias.values()),
                  "logit_bias values must be in [-100, 100]")

    def validate_for_vocab(self, vocab_size: int) -> None:
        """Checks that need the model: token ids inside the vocabulary."""
        for token_id in list(self.logit_bias or {}) + list(self.stop_token_ids or []):
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary (size {vocab_size})")

    def clone(self, **changes) -> "SamplingParams":
        values = {k: getattr(self, k) for k in self.__dataclass_fields__ if not k.startswith("_")}
        values.update(changes)
        return SamplingParams(**values)
