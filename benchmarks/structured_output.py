"""Structured output's cost, offline on the default model (issue 14's grammar benchmark).

1. Throughput: BATCH requests of MAX_TOKENS output tokens each, free (ignore_eos) vs every one under a JSON
   schema that cannot close before MAX_TOKENS (an array of at least 200 short strings), so both runs
   produce the same number of tokens; alternated ROUNDS times, best of each.
2. Time to first token of one request (max_tokens 1) with a schema never seen (cold: compiled on
   arrival) vs the same schema again (cached), and vs no schema.

    python benchmarks/structured_output.py [--batch 32] [--max-tokens 64] [--rounds 3] [--bounded]
"""

from __future__ import annotations

import argparse
import time

from splitfuse import LLM, SamplingParams, StructuredOutputsParams

# An array of strings that cannot close before MAX_TOKENS; --bounded gives each string a maxLength of 8
# (llguidance's slicer cannot skip bounded strings: masks cost ~30x more, see docs/benchmarks.md).
LONG_ARRAY = {"type": "array", "items": {"type": "string"}, "minItems": 200}
BOUNDED_ARRAY = {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 200}


def timed(llm: LLM, prompts, params) -> tuple[float, int]:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bounded", action="store_true", help="strings with maxLength 8")
    args = parser.parse_args()
    llm = LLM()
    prompts = [f"List {i + 3} words that rhyme with cat, as a JSON array:" for i in range(args.batch)]
    free = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                 structured_outputs=StructuredOutputsParams(json=BOUNDED_ARRAY if args.bounded else LONG_ARRAY))
    timed(llm, prompts, free)  # warm-up, and the schema compiled once
    timed(llm, prompts, constrained)
    best = {"free": float("inf"), "json": float("inf")}
    for _ in range(args.rounds):
        for name, params in (("free", free), ("json", constrained)):
            seconds, tokens = timed(llm, prompts, params)
            assert tokens == args.batch * args.max_tokens, tokens
            best[name] = min(best[name], seconds)
    rates = {name: args.batch * args.max_tokens / seconds for name, seconds in best.items()}
    print(f"batch {args.batch} x {args.max_tokens} tokens: free {rates['free']:.0f} tok/s, JSON-constrained "
          f"{rates['json']:.0f} tok/s ({rates['json'] / rates['free']:.3f}x)")

    one = ["Give me a JSON object:"]
    for label, make in (("no schema", lambda i: None),
                        ("cold schema", lambda i: {"type": "object", "properties": {f"k{i}": {"type": "integer"}},
                                                   "required": [f"k{i}"]}),
                        ("cached schema", lambda i: {"type": "object", "properties": {"k0": {"type": "integer"}},
                                                     "required": ["k0"]})):
        times = []
        for i in range(1, 6):
            schema = make(i)
            spec = None if schema is None else StructuredOutputsParams(json=schema)
            times.append(timed(llm, one, SamplingParams(temperature=0, max_tokens=1, structured_outputs=spec))[0])
        print(f"time to first token, {label}: {sorted(times)[len(times) // 2] * 1e3:.1f} ms (median of 5)")


if __name__ == "__main__":
    main()
