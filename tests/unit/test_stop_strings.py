"""Stop strings as one regex per request (``StopStrings``): the earliest start wins, and among stops that start
at the same place the first listed; exactly what a scan of every stop string with ``str.find`` gives.

Detokenizer cases use the tiny ByteLevel tokenizer, where every character below is one token, and
280 " c", 370 "at" are two tokens of " cat".
"""

from __future__ import annotations

import random

import pytest

from splitfuse.engine.detokenizer import IncrementalDetokenizer, StopStrings
from splitfuse.sampling_params import SamplingParams

CAT_IDS = [280, 370]  # " c", "at"


def reference_find(stops: list[str], text: str, start: int) -> tuple[int, str] | None:
    """The rule as a scan of every stop string: earliest start, then the first listed (strict <)."""
    best = None
    for stop in stops:
        where = text.find(stop, start)
        if where != -1 and (best is None or where < best[0]):
            best = (where, stop)
    return best


def char_ids(tokenizer, text: str) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(char) for char in text.replace(" ", "Ġ")]
    assert tokenizer.unk_token_id not in ids
    return ids


@pytest.mark.parametrize("stops, text, found", [
    (["or", "ell"], "the world hello", (5, "or")),      # earliest start wins, whatever the list order
    (["ell", "or"], "the world hello", (5, "or")),
    (["ab", "a"], "xab", (1, "ab")),                    # same start: the first listed wins
    (["a", "ab"], "xab", (1, "a")),
    (["abc", "ab", "a"], "zabc", (1, "abc")),
    (["bcd", "abc"], "xabcd", (1, "abc")),              # overlapping: "abc" starts first
    (["b", "ab", "b"], "ab", (0, "ab")),                # duplicates are harmless
    ([".*", "a+b", "(", "\\"], "aab x.*y", (5, ".*")),  # regex characters are literal
    (["a+b"], "aab", None),
    (["\n\n", "\nUser:"], "hi\nUser: x\n\n", (2, "\nUser:")),
    (["zz"], "abc", None),
])
def test_find_takes_the_earliest_stop_then_the_first_listed(stops, text, found):
    assert StopStrings(stops).find(text) == found == reference_find(stops, text, 0)


def test_find_starts_where_it_is_told_and_knows_the_longest_stop():
    stops = StopStrings(["ab", "abcd"])
    assert (stops.find("ab ab", 1), stops.find("ab ab", 4), stops.max_chars) == ((3, "ab"), None, 4)


def test_find_agrees_with_the_scan_on_random_texts_and_stops():
    rng = random.Random(0)
    for _ in range(3000):
        alphabet = "ab#" if rng.random() < 0.7 else "abc#é"
        stops = ["".join(rng.choices(alphabet, k=rng.randint(1, 4))) for _ in range(rng.randint(1, 8))]
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 12)))
        start = rng.randint(0, len(text))
        assert StopStrings(stops).find(text, start) == reference_find(stops, text, start), (stops, text, start)


def test_stops_completed_by_one_token_tie_to_the_first_listed(tiny_tokenizer):
    """ "at" arrives as one piece, so "a" and "at" both start at its first character."""
    def run(stops: list[str]) -> tuple[list, str]:
        detokenizer = IncrementalDetokenizer(tiny_tokenizer, [], SamplingParams(stop=stops,
                                                                                include_stop_str_in_output=True))
        return [detokenizer.update([token_id]) for token_id in CAT_IDS], detokenizer.output_text

    assert run(["at", "a"]) == ([None, "at"], " cat")
    assert run(["a", "at"]) == ([None, "a"], " ca")
    assert run(["t", "cat"]) == ([None, "cat"], " cat")  # "cat" starts in the older text, so it is earlier


def test_a_stop_spanning_tokens_is_found_on_the_token_that_completes_it(tiny_tokenizer):
    detokenizer = IncrementalDetokenizer(tiny_tokenizer, [], SamplingParams(stop=["zz", "o w", "low", "lo w"]))
    results = [detokenizer.update([token_id]) for token_id in char_ids(tiny_tokenizer, "hello world")]
    # "lo w" starts at 3, "o w" at 4: both complete on the "w", the earlier one wins.
    assert results == [None] * 6 + ["lo w"] + [None] * 4
    assert detokenizer.output_text == "hel"


def test_a_stop_string_before_min_tokens_does_not_count(tiny_tokenizer):
    # "l" shows at tokens 3 and 4 and 10; with min_tokens 5 only the one at token 10 stops the text.
    detokenizer = IncrementalDetokenizer(tiny_tokenizer, [], SamplingParams(stop=["l"], min_tokens=5))
    results = [detokenizer.update([token_id]) for token_id in char_ids(tiny_tokenizer, "hello world")]
    assert results == [None] * 9 + ["l"] + [None]
    assert detokenizer.output_text == "hello wor"


def test_the_stop_string_is_kept_when_asked(tiny_tokenizer):
    params = SamplingParams(stop=["wor", "o w"], include_stop_str_in_output=True)
    detokenizer = IncrementalDetokenizer(tiny_tokenizer, [], params)
    assert detokenizer.update(char_ids(tiny_tokenizer, "hello world")) == "o w"
    assert detokenizer.output_text == "hello w"


def test_streaming_holds_back_the_longest_stop_minus_one(tiny_tokenizer):
    detokenizer = IncrementalDetokenizer(tiny_tokenizer, [], SamplingParams(stop=["#!", "###", "x"]))
    deltas = []
    for token_id in char_ids(tiny_tokenizer, "ab##c#"):
        assert detokenizer.update([token_id]) is None
        deltas.append(detokenizer.get_next_output_text(finished=False, delta=True))
    deltas.append(detokenizer.get_next_output_text(finished=True, delta=True))
    assert deltas == ["", "", "a", "b", "#", "#", "c#"]  # 2 chars held back: "###" may still be forming
    assert detokenizer.update(char_ids(tiny_tokenizer, "!")) == "#!"
    assert detokenizer.output_text == "ab##c"


def test_one_stop_strings_object_serves_every_sequence_of_a_request(tiny_tokenizer):
    params = SamplingParams(stop=["at", "el"])
    shared = StopStrings(params.stop_strings)
    first = IncrementalDetokenizer(tiny_tokenizer, [], params, shared)
    second = IncrementalDetokenizer(tiny_tokenizer, [], params, shared)
    assert first.update(CAT_IDS) == "at"
    assert second.update(char_ids(tiny_tokenizer, "hello")) == "el"
    assert (first.output_text, second.output_text) == (" c", "h")
