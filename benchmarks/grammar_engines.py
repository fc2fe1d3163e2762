"""llguidance vs xgrammar on this machine, on the default model's tokenizer (issue 14's choice of engine).

For each JSON schema: compile time (cold), then a walk of up to MAX_STEPS tokens where each step computes
the next-token mask and takes a random allowed token (seeded), so both engines do the work a constrained
request does per step. Prints compile ms, mask us per token (mean, p99) and what failed to compile.

    python benchmarks/grammar_engines.py            # needs: pip install llguidance xgrammar
"""

from __future__ import annotations

import json
import random
import statistics
import time

import torch

from splitfuse.engine.resolved_config import load_tokenizer
from splitfuse.models.sources import resolve_model

MAX_STEPS = 120

SCHEMAS = {
    "any object": {"type": "object"},
    "person": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                                                "email": {"type": "string", "format": "email"}},
               "required": ["name", "age"], "additionalProperties": False},
    "enum + array": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 4}},
        "required": ["color", "tags"]},
    "nested $ref": {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"},
                                                                         "y": {"type": "number"}},
                                        "required": ["x", "y"]}},
                    "type": "object", "properties": {"a": {"$ref": "#/$defs/point"},
                                                     "path": {"type": "array", "items": {"$ref": "#/$defs/point"}}},
                    "required": ["a", "path"]},
    "anyOf": {"anyOf": [{"type": "integer"}, {"type": "object", "properties": {"k": {"type": "boolean"}},
                                              "required": ["k"]}]},
    "pattern": {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                                                 "date": {"type": "string", "format": "date"}},
                "required": ["id", "date"]},
    "tool call": {"type": "object", "properties": {
        "name": {"const": "get_weather"},
        "arguments": {"type": "object", "properties": {"city": {"type": "string"},
                                                       "unit": {"enum": ["celsius", "fahrenheit"]}},
                      "required": ["city"]}}, "required": ["name", "arguments"]},
}


def walk(next_mask, consume, done, vocab_size: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    times = []
    for _ in range(MAX_STEPS):
        if done():
            break
        start = time.perf_counter()
        mask = next_mask()
        times.append(time.perf_counter() - start)
        bits = mask.view(-1)
        allowed = [i for i in range(vocab_size) if (int(bits[i >> 5]) >> (i & 31)) & 1]
        if not allowed:
            break
        consume(rng.choice(allowed))
    return times


def bench_llguidance(tokenizer, vocab_size: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    start = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    results = {"tokenizer_s": time.perf_counter() - start}
    for name, schema in SCHEMAS.items():
        start = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        compile_s = time.perf_counter() - start
        if matcher.is_error():
            results[name] = f"error: {matcher.get_error()[:80]}"
            continue
        bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)

        def next_mask():
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            return bitmask

        times = walk(next_mask, matcher.consume_token, matcher.is_stopped, vocab_size, seed=1)
        results[name] = (compile_s, times)
    return results


def bench_xgrammar(tokenizer, vocab_size: int) -> dict:
    import xgrammar

    start = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    results = {"tokenizer_s": time.perf_counter() - start}
    for name, schema in SCHEMAS.items():
        start = time.perf_counter()
        try:
            compiled = compiler.compile_json_schema(json.dumps(schema))
        except Exception as error:  # noqa: BLE001 - the benchmark reports what does not compile
            results[name] = f"error: {str(error)[:80]}"
            continue
        matcher = xgrammar.GrammarMatcher(compiled)
        compile_s = time.perf_counter() - start
        bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)

        def next_mask():
            matcher.fill_next_token_bitmask(bitmask, 0)
            return bitmask

        times = walk(next_mask, matcher.accept_token, matcher.is_terminated, vocab_size, seed=1)
        results[name] = (compile_s, times)
    return results


def main() -> None:
    torch.set_num_threads(2)
    tokenizer = load_tokenizer(resolve_model("").path)
    vocab_size = len(tokenizer)
    print(f"tokenizer: SmolLM2-135M-Instruct, {vocab_size} tokens; {MAX_STEPS} steps at most per schema")
    for engine, bench in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        results = bench(tokenizer, vocab_size)
        print(f"\n{engine}: tokenizer set-up {results.pop('tokenizer_s') * 1e3:.0f} ms")
        all_times = []
        for name, result in results.items():
            if isinstance(result, str):
                print(f"  {name:14s} {result}")
                continue
            compile_s, times = result
            all_times += times
            p99 = sorted(times)[int(0.99 * (len(times) - 1))] if times else 0.0
            print(f"  {name:14s} compile {compile_s * 1e3:7.1f} ms   mask {statistics.mean(times) * 1e6:7.1f} us "
                  f"mean, {p99 * 1e6:7.1f} us p99 over {len(times)} tokens")
        print(f"  all            mask {statistics.mean(all_times) * 1e6:7.1f} us mean over {len(all_times)} tokens")


if __name__ == "__main__":
    main()
