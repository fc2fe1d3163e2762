"""Grammars for structured output, on llguidance: a request's constraint -> a compiled matcher -> token masks.

Why llguidance (``benchmarks/grammar_engines.py``, docs/benchmarks.md): on this machine it compiles a JSON
schema in ~1.5 ms (xgrammar 2-22 ms), computes a mask in tens of microseconds like xgrammar, covers
JSON schema, regex, Lark and GBNF, and is one wheel without dependencies (xgrammar brings triton).

``check`` is the frontend's validation (no tokenizer needed; a bad schema is an error naming the problem
before anything is queued). ``GrammarCompiler`` is the core's: it compiles off the engine thread, once per
constraint (later requests copy the cached matcher), and ``fill_bitmask`` writes one step's masks: bit
``t % 32`` of word ``t // 32`` of a row is set iff token ``t`` is allowed.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import threading
from typing import Any

import numpy as np

from splitfuse.sampling_params import StructuredOutputsParams

# No free whitespace between JSON tokens: a small model offered it can emit blank lines until max_tokens.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def closed_objects(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever an object lists ``properties`` and says
    nothing of others (xgrammar's and OpenAI's strict mode): otherwise a model may add keys of its own
    until max_tokens. A schema that sets ``additionalProperties`` keeps it."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(item) for item in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(sub) for name, sub in out[key].items()}
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), dict):
            out[key] = closed_objects(out[key])
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def llguidance_grammar(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar text of a constraint; ValueError if the JSON schema is not JSON."""
    return _grammar_of(*spec.key)


def _grammar_of(kind: str, text: str) -> str:
    import llguidance
    from llguidance.gbnf_to_lark import any_to_lark

    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=_JSON_OPTIONS)
    if kind == "json":
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"the JSON schema is not valid JSON: {error}") from error
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(closed_objects(schema)),
                                                             defaults=_JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(text)
    if kind == "choice":
        return llguidance.grammar_from("choice", text)
    try:  # Lark as it is; GBNF (root ::= ...) converted to Lark
        lark = any_to_lark(text)
    except Exception as error:  # noqa: BLE001 - the converter raises plain Exceptions on bad input
        raise ValueError(f"invalid grammar (read as GBNF): {error}") from error
    return llguidance.LLMatcher.grammar_from_lark(lark)


_WHAT = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex", "choice": "choice",
         "grammar": "grammar"}


def check(spec: StructuredOutputsParams) -> None:
    """Raises ValueError naming what is wrong with the schema, regex or grammar; returns if it compiles."""
    message = _problem_of(spec.key)
    if message:
        raise ValueError(message)


@functools.lru_cache(maxsize=1024)
def _problem_of(key: tuple[str, str]) -> str:
    """What is wrong with a constraint ("" if nothing), once per constraint: the server and the engine's input
    processor check the same one, and clients send the same schema (or tool) again and again."""
    import llguidance

    kind, text = key
    try:
        grammar = _grammar_of(kind, text)
    except ValueError as error:
        return str(error)
    message = llguidance.LLMatcher.validate_grammar(grammar, None)
    return f"invalid {_WHAT[kind]}: {message.strip()}" if message else ""


class GrammarCompiler:
    """Compiles constraints for one tokenizer in a thread of its own and caches the results.

    ``submit`` returns a future of a fresh matcher (a copy of the cached one when the constraint was
    seen before, so its state is the request's own); the engine step never waits on it.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        self._hf_tokenizer = tokenizer
        self._eos_token_ids = eos_token_ids
        self._lltokenizer = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self._cache: dict[tuple[str, str], Any] = {}  # key -> the matcher in its start state, never advanced
        self._lock = threading.Lock()
        self.num_compiled = 0
        # The token table (~0.4 s of CPU for SmolLM2) is built in the compile thread by the first compile, so
        # an engine that never sees a constraint never pays for it; that first constrained request waits.

    def submit(self, spec: StructuredOutputsParams) -> concurrent.futures.Future:
        with self._lock:
            cached = self._cache.get(spec.key)
        if cached is not None:
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_result(cached.deep_copy())
            return future
        return self._pool.submit(self._compile, spec)

    def _compile(self, spec: StructuredOutputsParams):
        import llguidance

        with self._lock:
            cached = self._cache.get(spec.key)  # compiled meanwhile for an earlier request
        if cached is None:
            matcher = llguidance.LLMatcher(self._tokenizer(), llguidance_grammar(spec), log_level=0)
            if matcher.is_error():
                raise ValueError(f"invalid {spec.key[0]} constraint: {matcher.get_error()}")
            with self._lock:
                cached = self._cache.setdefault(spec.key, matcher)
                self.num_compiled += 1
        return cached.deep_copy()

    def _tokenizer(self):
        if self._lltokenizer is None:
            import llguidance.hf

            self._lltokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                             eos_token=self._eos_token_ids)
        return self._lltokenizer

    def fill_bitmask(self, matchers: list, bitmask: np.ndarray) -> None:
        """Row i of ``bitmask`` (int32, [len(matchers), bitmask_words]) gets matcher i's next-token mask."""
        for i, matcher in enumerate(matchers):
            row = bitmask[i]
            matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def disallowed_tokens(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """[rows, words] int32 -> [rows, vocab_size] bool, True where token t is NOT allowed (bit t % 32 of
    word t // 32 clear): unpacked from the inverted words, so the sampler fills without a negation."""
    inverted = np.invert(np.ascontiguousarray(bitmask)).view(np.uint8)
    return np.unpackbits(inverted, axis=1, count=vocab_size, bitorder="little").view(np.bool_)
