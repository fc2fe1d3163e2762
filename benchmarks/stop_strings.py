"""Stop strings' cost in the detokenizer: one sequence of 2,000 tokens, one token per update, with 0-256 stops.

The text is English prose in the default model's tokenizer; the stop strings are random lowercase words
(seeded) that never occur in it, so every update searches to the end, as a request that runs to its
length limit does. Each update also asks for the streamable text, as a DELTA request does every step.
Prints, per number of stop strings, the best of 5 runs: ms for the 2,000 tokens and us per token.

    python benchmarks/stop_strings.py
"""

from __future__ import annotations

import random
import string
import time

from splitfuse.engine.detokenizer import IncrementalDetokenizer
from splitfuse.engine.resolved_config import load_tokenizer
from splitfuse.models.sources import resolve_model
from splitfuse.sampling_params import SamplingParams

NUM_TOKENS = 2000
NUM_RUNS = 5
STOP_COUNTS = (0, 1, 16, 256)
PROSE = ("The committee met on Tuesday to discuss the budget for the coming year. After a long debate about "
         "roads, schools and the new library, the members agreed to postpone the vote until the spring, when "
         "the figures from the tax office would be known. Several residents spoke in favour of the plan; "
         "others asked why the park had been left out again.\n\n")


def stop_words(count: int, text: str, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words: list[str] = []
    while len(words) < count:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 12)))
        if word not in text and word not in words:
            words.append(word)
    return words


def detokenize(tokenizer, token_ids: list[int], stops: list[str]) -> float:
    """Seconds to push every id through a fresh detokenizer (construction included), streaming as it goes."""
    start = time.perf_counter()
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=stops or None))
    for token_id in token_ids:
        assert detokenizer.update([token_id]) is None
        detokenizer.get_next_output_text(finished=False, delta=True)
    return time.perf_counter() - start


def main() -> None:
    tokenizer = load_tokenizer(resolve_model("").path)
    token_ids: list[int] = []
    while len(token_ids) < NUM_TOKENS:
        token_ids += tokenizer.encode(PROSE, add_special_tokens=False)
    token_ids = token_ids[:NUM_TOKENS]
    text = tokenizer.decode(token_ids)
    print(f"{NUM_TOKENS} tokens, {len(text)} characters; best of {NUM_RUNS} runs")
    print("| stop strings | ms for 2,000 tokens | us per token |")
    print("| --- | --- | --- |")
    for count in STOP_COUNTS:
        stops = stop_words(count, text)
        best_s = min(detokenize(tokenizer, token_ids, stops) for _ in range(NUM_RUNS))
        print(f"| {count} | {best_s * 1e3:.1f} | {best_s / NUM_TOKENS * 1e6:.1f} |")


if __name__ == "__main__":
    main()
