"""Workloads: prompts of exact token lengths — synthetic, shared-prefix, multi-turn, or sized by a trace.

A workload is a list of sessions; a session is a list of requests sent one after
another (a multi-turn conversation), or a single request. Prompts are seeded
random token ids in [vocab_low, vocab_high), so a prompt's length in tokens is
exact when it is sent as token ids.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from splitfuse.bench.arrivals import TraceEntry

WORKLOAD_KINDS = ("synthetic", "shared-prefix", "multi-turn")
LENGTH_KINDS = ("fixed", "uniform", "normal")
# FastGen draws prompt and output lengths from a normal with std = 0.3 × mean.
DEFAULT_NORMAL_STD_FRACTION = 0.3


@dataclass(frozen=True)
class LengthDist:
    """A distribution of token lengths; every sample is a whole number >= 1.

    fixed:   always ``mean``.
    uniform: integers in [low, high], inclusive.
    normal:  round(N(mean, std)), std defaulting to 0.3 × mean, clipped to >= 1.
    """

    kind: str
    mean: int
    low: int = 0
    high: int = 0
    std: Optional[float] = None

    def __post_init__(self) -> None:
        if self.kind not in LENGTH_KINDS:
            raise ValueError(f"length kind must be one of {LENGTH_KINDS}, got {self.kind!r}")
        if self.kind == "uniform" and not 1 <= self.low <= self.high:
            raise ValueError(f"uniform lengths need 1 <= low <= high, got {self.low}..{self.high}")
        if self.kind != "uniform" and self.mean < 1:
            raise ValueError(f"length must be >= 1, got {self.mean}")

    @classmethod
    def parse(cls, text: str) -> "LengthDist":
        """'512' | 'fixed:512' | 'uniform:256:768' | 'normal:512' | 'normal:512:100' (mean:std)."""
        parts = str(text).split(":")
        try:
            if len(parts) == 1:
                return cls("fixed", int(parts[0]))
            kind, numbers = parts[0], [float(part) for part in parts[1:]]
            if kind == "fixed" and len(numbers) == 1:
                return cls("fixed", int(numbers[0]))
            if kind == "uniform" and len(numbers) == 2:
                low, high = int(numbers[0]), int(numbers[1])
                return cls("uniform", (low + high) // 2, low=low, high=high)
            if kind == "normal" and len(numbers) in (1, 2):
                std = numbers[1] if len(numbers) == 2 else None
                return cls("normal", int(numbers[0]), std=std)
        except ValueError as exc:
            raise ValueError(f"bad length spec {text!r}: {exc}") from exc
        raise ValueError(
            f"bad length spec {text!r}; use N, fixed:N, uniform:LOW:HIGH, normal:MEAN[:STD]"
        )

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(count, self.mean, dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(self.low, self.high + 1, size=count)
        std = self.std if self.std is not None else DEFAULT_NORMAL_STD_FRACTION * self.mean
        return np.maximum(1, np.rint(rng.normal(self.mean, std, size=count))).astype(np.int64)

    def describe(self) -> str:
        if self.kind == "uniform":
            return f"uniform:{self.low}:{self.high}"
        if self.kind == "normal" and self.std is not None:
            return f"normal:{self.mean}:{self.std:g}"
        return f"{self.kind}:{self.mean}"


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: its prompt (token ids, and text when sent as text) and output length."""

    request_id: int
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    conversation_id: Optional[int] = None
    turn: int = 0
    prompt_text: Optional[str] = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


Session = list[RequestSpec]


@dataclass(frozen=True)
class WorkloadConfig:
    """What to send. ``prompt_len`` is the whole prompt (synthetic), the part after
    the shared prefix (shared-prefix), or the new user tokens of each turn (multi-turn)."""

    kind: str = "synthetic"
    num_requests: int = 100
    prompt_len: LengthDist = LengthDist("fixed", 512)
    output_len: LengthDist = LengthDist("fixed", 128)
    num_prefixes: int = 4
    prefix_len: int = 1024
    num_turns: int = 4
    vocab_low: int = 100
    vocab_high: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in WORKLOAD_KINDS:
            raise ValueError(f"workload must be one of {WORKLOAD_KINDS}, got {self.kind!r}")
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if not 0 <= self.vocab_low < self.vocab_high:
            raise ValueError(f"need 0 <= vocab_low < vocab_high, got {self.vocab_low}, {self.vocab_high}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["prompt_len"] = self.prompt_len.describe()
        data["output_len"] = self.output_len.describe()
        return data


def build_sessions(config: WorkloadConfig, trace: Optional[Sequence[TraceEntry]] = None) -> list[Session]:
    """Exactly ``config.num_requests`` requests (fewer if a trace is shorter), grouped in sessions."""
    rng = np.random.default_rng(config.seed)
    if trace is not None:
        return _from_trace(config, trace, rng)
    if config.kind == "shared-prefix":
        return _shared_prefix(config, rng)
    if config.kind == "multi-turn":
        return _multi_turn(config, rng)
    return _synthetic(config, rng)


def flatten(sessions: Sequence[Session]) -> list[RequestSpec]:
    return [spec for session in sessions for spec in session]


def _random_ids(config: WorkloadConfig, length: int, rng: np.random.Generator) -> tuple[int, ...]:
    return tuple(int(i) for i in rng.integers(config.vocab_low, config.vocab_high, size=int(length)))


def _synthetic(config: WorkloadConfig, rng: np.random.Generator) -> list[Session]:
    prompt_lens = config.prompt_len.sample(config.num_requests, rng)
    output_lens = config.output_len.sample(config.num_requests, rng)
    return [
        [RequestSpec(index, _random_ids(config, prompt_lens[index], rng), int(output_lens[index]))]
        for index in range(config.num_requests)
    ]


def _shared_prefix(config: WorkloadConfig, rng: np.random.Generator) -> list[Session]:
    """K long prefixes (system prompts, documents); each request = one of them + its own question."""
    prefixes = [_random_ids(config, config.prefix_len, rng) for _ in range(config.num_prefixes)]
    choices = rng.integers(0, config.num_prefixes, size=config.num_requests)
    suffix_lens = config.prompt_len.sample(config.num_requests, rng)
    output_lens = config.output_len.sample(config.num_requests, rng)
    return [
        [RequestSpec(
            index,
            prefixes[choices[index]] + _random_ids(config, suffix_lens[index], rng),
            int(output_lens[index]),
            conversation_id=int(choices[index]),  # which prefix, kept for analysis
        )]
        for index in range(config.num_requests)
    ]


def _multi_turn(config: WorkloadConfig, rng: np.random.Generator) -> list[Session]:
    """Conversations of ``num_turns`` turns; turn t's prompt is turn t-1's prompt, then
    stand-in ids for turn t-1's answer (same length as its max_tokens; the server's
    real answer is text we cannot re-tokenize exactly), then new user tokens."""
    sessions: list[Session] = []
    request_id = 0
    while request_id < config.num_requests:
        conversation_id = len(sessions)
        turns = min(config.num_turns, config.num_requests - request_id)
        user_lens = config.prompt_len.sample(turns, rng)
        output_lens = config.output_len.sample(turns, rng)
        history: tuple[int, ...] = ()
        session: Session = []
        for turn in range(turns):
            if turn > 0:
                history += _random_ids(config, output_lens[turn - 1], rng)
            history += _random_ids(config, user_lens[turn], rng)
            session.append(RequestSpec(request_id, history, int(output_lens[turn]),
                                       conversation_id=conversation_id, turn=turn))
            request_id += 1
        sessions.append(session)
    return sessions


def _from_trace(config: WorkloadConfig, trace: Sequence[TraceEntry], rng: np.random.Generator) -> list[Session]:
    entries = trace[: config.num_requests]
    return [
        [RequestSpec(index, _random_ids(config, entry.prompt_tokens, rng), entry.output_tokens)]
        for index, entry in enumerate(entries)
    ]


# ---------------------------------------------------------------- text prompts


def text_of_length(tokenizer: Any, token_ids: Sequence[int], max_rounds: int = 8) -> tuple[str, tuple[int, ...]]:
    """Text that ``tokenizer`` encodes to exactly len(token_ids) tokens, and those tokens.

    Decoding ids and encoding the text again rarely gives back the same count
    (merges across id boundaries), so we trim or pad and retry a few rounds.
    If it never settles, the last round's text is returned with its true ids.
    """
    target = len(token_ids)
    ids = list(token_ids)
    text, encoded = "", []
    for _ in range(max_rounds):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        encoded = list(tokenizer.encode(text, add_special_tokens=False))
        if len(encoded) == target:
            break
        # too long: keep the first `target` ids; too short: pad from the original ids
        ids = encoded[:target] + list(token_ids[: max(0, target - len(encoded))])
    return text, tuple(encoded)


def attach_text(sessions: Sequence[Session], tokenizer: Any) -> list[Session]:
    """Sessions whose prompts carry text of the requested token length (ids re-counted)."""
    result = []
    for session in sessions:
        converted = []
        for spec in session:
            text, ids = text_of_length(tokenizer, spec.prompt_token_ids)
            converted.append(dataclasses.replace(spec, prompt_token_ids=ids, prompt_text=text))
        result.append(converted)
    return result
