"""Speculative decoding (n-gram prompt lookup, or a draft model) vs plain decoding, offline, on the default model.

Workloads: "repeat" (copy / lightly edit a given text: n-gram lookup pays) and "open" (open-ended
questions: it rarely does); batch sizes 1, 8 and 32 (32 is past speculative_max_batch, 8 by default:
speculation turns itself off there). Greedy, 128 output tokens at most; plain and speculating engines
alternate, best of ROUNDS; the greedy outputs are checked identical.

    python benchmarks/speculative.py [--rounds 3] [--max-tokens 128] [--draft-model DIR]

--draft-model: speculate with that draft model (speculative_method="draft", the default model's vocabulary)
instead of n-gram lookup.
"""

from __future__ import annotations

import argparse
import time

from splitfuse import LLM, SamplingParams

TEXT = ("The committee met on Tuesday to review the budget for the new library. After a long discussion, "
        "the members agreed to fund the children's reading room, to extend the opening hours on weekends, "
        "and to buy two hundred new books on science and history.")
REPEAT = [f"Repeat the following text word for word: {TEXT}",
          f"Rewrite this text, changing Tuesday to Friday and nothing else: {TEXT}",
          f"Copy this sentence exactly, then stop: {TEXT}",
          f"Here is a note: {TEXT} Write the note again."]
OPEN = ["Write a short story about a dragon who learns to cook.", "What are the benefits of exercise?",
        "Describe the city of Paris for a tourist.", "Explain how a rainbow forms."]


def chats(questions: list[str], batch: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": questions[i % len(questions)]}] for i in range(batch)]


def run(llm: LLM, prompts, params) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    outputs = llm.chat(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--draft-model", default=None)
    args = parser.parse_args()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    method = "ngram" if args.draft_model is None else "draft"
    plain, spec = LLM(), LLM(speculative_method=method, speculative_model=args.draft_model)
    stats = spec.engine.engine_core.scheduler.speculator.stats
    print(f"{'workload':8s} {'batch':>5s} {'plain tok/s':>12s} {method + ' tok/s':>12s} {'speed-up':>9s} "
          f"{'accepted':>9s} {'drafts/step':>11s}")
    for name, questions in (("repeat", REPEAT), ("open", OPEN)):
        for batch in (1, 8, 32):
            prompts = chats(questions, batch)
            run(plain, prompts, params), run(spec, prompts, params)  # warm-up
            best = {"plain": float("inf"), method: float("inf")}
            before = (stats.draft_tokens, stats.accepted_tokens, stats.steps)
            for _ in range(args.rounds):
                seconds, reference = run(plain, prompts, params)
                best["plain"] = min(best["plain"], seconds)
                seconds, speculated = run(spec, prompts, params)
                best[method] = min(best[method], seconds)
                assert speculated == reference, "greedy output changed under speculation"
            tokens = sum(len(t) for t in reference)
            drafts, accepted, steps = (stats.draft_tokens - before[0], stats.accepted_tokens - before[1],
                                       stats.steps - before[2])
            rate = f"{accepted / drafts:.0%}" if drafts else "-"
            per_step = f"{drafts / steps:.1f}" if steps else "-"
            print(f"{name:8s} {batch:5d} {tokens / best['plain']:12.0f} {tokens / best[method]:12.0f} "
                  f"{best['plain'] / best[method]:8.2f}x {rate:>9s} {per_step:>11s}")


if __name__ == "__main__":
    main()
