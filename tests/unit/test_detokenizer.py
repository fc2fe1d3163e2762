"""IncrementalDetokenizer specification: streamed deltas add up to the full decode, split
multi-byte characters never leak U+FFFD, stop strings cut exactly, partial stops are held back."""

from __future__ import annotations

import json
import random
from functools import lru_cache

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from splitfuse.engine.detokenizer import IncrementalDetokenizer
from splitfuse.sampling_params import SamplingParams

SPECIALS = ["<unk>", "<s>", "</s>"]
WORDS = ["hello", "world", "the", "quick", "brown", "fox", "stop", "here", "token", "café", "naïve", "ok"]
# Rare characters: kept out of the learned vocab, so they are split over several byte tokens.
RARE = ["日本", "語", "😀", "🎉", "👍🏽", "Köln", "∑"]
CORPUS = [" ".join(WORDS[i:] + WORDS[:i]) + "." for i in range(len(WORDS))] * 10


@lru_cache(maxsize=None)
def make_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """kind "byte_level": GPT-2 style BPE. kind "byte_fallback": Llama-2 style (Metaspace,
    <0xNN> byte tokens, the decoder strips the text's leading space)."""
    if kind == "byte_level":
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=SPECIALS, limit_alphabet=40)
    backend.train_from_iterator(CORPUS, trainer)
    if kind == "byte_fallback":
        backend = with_byte_tokens(backend)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def with_byte_tokens(backend: Tokenizer) -> Tokenizer:
    """Appends <0x00>..<0xFF> to the model vocab as ordinary tokens (a trainer would make them special,
    and skip_special_tokens would then drop them)."""
    state = json.loads(backend.to_str())
    vocab = state["model"]["vocab"]
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    return Tokenizer.from_str(json.dumps(state))


def random_text(rng: random.Random) -> str:
    pieces = [rng.choice(WORDS + RARE) for _ in range(rng.randint(1, 8))]
    return " ".join(pieces) + rng.choice(["", ".", "!"])


def natural_ids(tokenizer: PreTrainedTokenizerFast, rng: random.Random) -> list[int]:
    """Ids a model could produce: encoded text with special tokens mixed in, cut anywhere
    (possibly inside a multi-byte character)."""
    ids: list[int] = []
    for _ in range(rng.randint(1, 3)):
        ids += tokenizer.encode(random_text(rng), add_special_tokens=False)
        if rng.random() < 0.5:
            ids.append(rng.choice([tokenizer.bos_token_id, tokenizer.eos_token_id]))
    return ids[:rng.randint(1, len(ids))]


def stream(tokenizer, prompt_ids: list[int], output_ids: list[int], rng: random.Random | None = None,
           **params) -> tuple[list[str], IncrementalDetokenizer]:
    """Feeds output_ids one id at a time (1-3 with rng); returns every streamed delta, the last at finish."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(**params))
    deltas, position = [], 0
    while position < len(output_ids):
        chunk = rng.randint(1, 3) if rng else 1
        detokenizer.update(output_ids[position:position + chunk])
        position += chunk
        deltas.append(detokenizer.get_next_output_text(finished=False, delta=True))
    deltas.append(detokenizer.get_next_output_text(finished=True, delta=True))
    return deltas, detokenizer


def ids_of_chars(tokenizer, text: str) -> list[int]:
    """One token per character (every character below is a single token in both tokenizers)."""
    ids = [tokenizer.convert_tokens_to_ids(char) for char in text.replace(" ", "Ġ")]
    assert tokenizer.unk_token_id not in ids and None not in ids
    return ids


@pytest.mark.parametrize("kind", ["byte_level", "byte_fallback"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_add_up_to_the_full_decode(kind, skip_special_tokens):
    tokenizer = make_tokenizer(kind)
    rng = random.Random(0)
    for _ in range(300):
        output_ids = natural_ids(tokenizer, rng)
        deltas, detokenizer = stream(tokenizer, [], output_ids, rng, skip_special_tokens=skip_special_tokens)
        expected = tokenizer.decode(output_ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == expected == detokenizer.output_text


@pytest.mark.parametrize("kind", ["byte_level", "byte_fallback"])
def test_deltas_add_up_for_arbitrary_ids(kind):
    """Any ids at all, invalid byte sequences included (byte-level output needs no prompt
    context to match; byte-fallback output starts after the prompt's stripped space)."""
    tokenizer = make_tokenizer(kind)
    rng = random.Random(1)
    for _ in range(300):
        output_ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 12))]
        prompt_ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 6))] if kind == "byte_level" else []
        skip_special_tokens = rng.random() < 0.5
        deltas, _ = stream(tokenizer, prompt_ids, output_ids, rng, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == tokenizer.decode(output_ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("kind", ["byte_level", "byte_fallback"])
def test_prompt_context_keeps_the_leading_space_and_never_repeats_the_prompt(kind):
    tokenizer = make_tokenizer(kind)
    rng = random.Random(2)
    for _ in range(200):
        prompt_ids = tokenizer.encode(random_text(rng), add_special_tokens=False)
        output_ids = tokenizer.encode(random_text(rng) + " " + random_text(rng), add_special_tokens=False)
        deltas, _ = stream(tokenizer, prompt_ids, output_ids, rng)
        prompt_text = tokenizer.decode(prompt_ids)
        full_text = tokenizer.decode(prompt_ids + output_ids)
        assert full_text.startswith(prompt_text)
        assert "".join(deltas) == full_text[len(prompt_text):]


def test_byte_fallback_first_output_token_keeps_its_space():
    tokenizer = make_tokenizer("byte_fallback")
    prompt_ids = tokenizer.encode("hello", add_special_tokens=False)
    output_ids = tokenizer.encode("hello world", add_special_tokens=False)[len(prompt_ids):]
    assert tokenizer.decode(output_ids) == "world"  # alone, the decoder strips the space
    assert "".join(stream(tokenizer, prompt_ids, output_ids)[0]) == " world"


def test_prompt_ending_inside_a_character_does_not_leak_into_the_output():
    tokenizer = make_tokenizer("byte_level")
    ids = tokenizer.encode("ok 😀", add_special_tokens=False)
    assert len(tokenizer.decode(ids[-1:])) == 1 and tokenizer.decode(ids[-1:]) == "\ufffd"
    deltas, detokenizer = stream(tokenizer, ids[:-1], ids[-1:] + tokenizer.encode(" ok", add_special_tokens=False))
    assert "".join(deltas) == detokenizer.output_text == "\ufffd ok"


@pytest.mark.parametrize("kind", ["byte_level", "byte_fallback"])
def test_characters_split_across_tokens_never_stream_a_replacement_char(kind):
    tokenizer = make_tokenizer(kind)
    for text in ["日本語 😀 🎉 👍🏽 ∑", "Köln é 日本", "😀😀😀"]:
        output_ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(output_ids) > len(text.replace(" ", ""))  # some characters span several tokens
        deltas, _ = stream(tokenizer, [], output_ids)
        assert "".join(deltas) == text
        assert "" in deltas[:-1]  # an incomplete character was held back
        assert not any("\ufffd" in delta for delta in deltas)


def test_byte_fallback_run_is_released_when_a_normal_token_closes_it():
    tokenizer = make_tokenizer("byte_fallback")
    output_ids = tokenizer.encode("ok 😀 ok", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(output_ids) == [
        "▁ok", "▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "▁ok"]
    assert stream(tokenizer, [], output_ids)[0] == ["ok", " ", "", "", "", "", "😀 ok", ""]


def test_byte_fallback_sequence_cut_inside_a_character_ends_like_decode():
    # ByteFallback turns the whole run into one U+FFFD per byte, "日" included, which is
    # why a run is only streamed once it is closed.
    tokenizer = make_tokenizer("byte_fallback")
    output_ids = tokenizer.encode("ok 日本", add_special_tokens=False)[:-1]
    deltas, detokenizer = stream(tokenizer, [], output_ids)
    assert "".join(deltas) == detokenizer.output_text == tokenizer.decode(output_ids) == "ok " + "\ufffd" * 5


def test_stop_string_across_token_boundary_cuts_at_its_start():
    tokenizer = make_tokenizer("byte_level")
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["lo w", "zzz"]))
    results = [detokenizer.update([token_id]) for token_id in ids_of_chars(tokenizer, "hello world")]
    assert results == [None] * 6 + ["lo w"] + [None] * 4  # found on the "w"; later ids are ignored
    assert detokenizer.output_text == "hel"
    assert detokenizer.get_next_output_text(finished=True, delta=False) == "hel"


def test_stop_string_included_when_asked():
    tokenizer = make_tokenizer("byte_level")
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop="lo w", include_stop_str_in_output=True))
    assert detokenizer.update(ids_of_chars(tokenizer, "hello world")) == "lo w"
    assert detokenizer.output_text == "hello w"


def test_earliest_stop_string_wins_within_one_update():
    tokenizer = make_tokenizer("byte_level")
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["or", "ell"]))
    assert detokenizer.update(ids_of_chars(tokenizer, "the world hello")) == "or"
    assert detokenizer.output_text == "the w"


def test_stop_string_inside_one_token():
    tokenizer = make_tokenizer("byte_level")
    output_ids = tokenizer.encode("the quick brown", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(output_ids) == ["the", "Ġquick", "Ġbrown"]
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop="uic"))
    assert [detokenizer.update([token_id]) for token_id in output_ids] == [None, "uic", None]
    assert detokenizer.output_text == "the q"


def test_partial_stop_string_is_held_back_while_streaming():
    tokenizer = make_tokenizer("byte_level")
    deltas, detokenizer = stream(tokenizer, [], ids_of_chars(tokenizer, "ab##c#"), stop="###")
    # hold back 2 chars: "a", "ab", "ab#", "ab##", "ab##c", "ab##c#" -> stream up to len - 2
    assert deltas == ["", "", "a", "b", "#", "#", "c#"]
    assert detokenizer.output_text == "ab##c#"


def test_completed_stop_string_is_never_streamed():
    tokenizer = make_tokenizer("byte_level")
    deltas, detokenizer = stream(tokenizer, [], ids_of_chars(tokenizer, "ab###cd"), stop="###")
    assert deltas == ["", "", "a", "b", "", "", "", ""]
    assert detokenizer.output_text == "ab"


def test_cumulative_streaming_returns_the_text_so_far():
    tokenizer = make_tokenizer("byte_level")
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop="###"))
    detokenizer.update(ids_of_chars(tokenizer, "hello"))
    assert detokenizer.get_next_output_text(finished=False, delta=False) == "hel"
    assert detokenizer.get_next_output_text(finished=True, delta=False) == "hello"


@pytest.mark.parametrize("kind", ["byte_level", "byte_fallback"])
def test_skip_special_tokens(kind):
    tokenizer = make_tokenizer(kind)
    output_ids = [tokenizer.bos_token_id] + tokenizer.encode("ok", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert "".join(stream(tokenizer, [], output_ids, skip_special_tokens=True)[0]) == "ok"
    with_specials = "".join(stream(tokenizer, [], output_ids, skip_special_tokens=False)[0])
    assert with_specials == tokenizer.decode(output_ids, skip_special_tokens=False)
    assert with_specials == {"byte_level": "<s>ok</s>", "byte_fallback": "<s> ok</s>"}[kind]


def test_detokenize_false_produces_no_text():
    tokenizer = make_tokenizer("byte_level")
    detokenizer = IncrementalDetokenizer(tokenizer, [1, 2], SamplingParams(detokenize=False, stop="o"))
    assert detokenizer.update(tokenizer.encode("hello", add_special_tokens=False)) is None
    assert detokenizer.output_text == ""
    assert detokenizer.get_next_output_text(finished=True, delta=True) == ""
