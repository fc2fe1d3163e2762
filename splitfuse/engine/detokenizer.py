"""IncrementalDetokenizer: one sequence's output tokens -> text as they arrive, with stop strings.

The streamed pieces add up to ``tokenizer.decode(output_ids)`` for any ids at all
(``clean_up_tokenization_spaces`` aside, which transformers skips for BPE anyway);
a multi-byte character split over tokens is held back until it is complete.

Two ways to decode, picked once per request from the tokenizer's decoder:

- ByteLevel (GPT-2, Llama-3, Qwen): decoding is additive, decode(a + b) ==
  decode(a) + decode(b) whenever decode(a) ends on a whole character, so the
  ``tokenizers`` library's own ``DecodeStream`` is exact; prompt context is not needed.
- anything else (sentencepiece / byte-fallback: Llama-2, Mistral): a sliding window of
  ids (the prefix/read-offset method) started on the prompt's last few ids, because these
  decoders strip the leading space of a decode's first token. DecodeStream is not used
  here: ByteFallback rewrites earlier text when a byte run turns out invalid, on which
  DecodeStream raises "invalid prefix", and it cannot flush an unfinished character.
"""

from __future__ import annotations

import re

from tokenizers import Tokenizer, decoders
from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerFast

from splitfuse.sampling_params import SamplingParams

# Prompt ids decoded ahead of the output so that its first token keeps its leading space.
_PROMPT_CONTEXT_TOKENS = 5
# How far back from the prompt's end to look for a clean context before giving up.
_MAX_CONTEXT_SEARCH_TOKENS = 32
_REPLACEMENT_CHAR = "\ufffd"


class _StreamDecoder:
    """ByteLevel decoders: the library's DecodeStream, plus the ids it has not emitted yet."""

    def __init__(self, backend: Tokenizer, skip_special_tokens: bool) -> None:
        self._backend = backend
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._pending_ids: list[int] = []

    def push(self, token_id: int) -> str | None:
        """Text that ``token_id`` completes, or None while a character is unfinished."""
        piece = self._stream.step(self._backend, token_id)
        if piece is None:
            self._pending_ids.append(token_id)
        else:
            self._pending_ids.clear()
        return piece

    def tail(self) -> str:
        """Text of the ids not emitted yet, unfinished characters as U+FFFD (additivity again)."""
        if not self._pending_ids:
            return ""
        return self._backend.decode(self._pending_ids, skip_special_tokens=self._skip_special_tokens)


class _WindowDecoder:
    """Other decoders: decode ``read + pending`` ids, where ``read`` are the ids behind the
    last emitted piece (context only), and emit the text past ``decode(read)``.

    Holds back text ending in U+FFFD and text of an open byte-fallback run: ByteFallback
    turns a whole run of <0xNN> tokens into U+FFFD (one per byte) when any byte in it is
    bad, complete characters included: [<0xE6> <0x97> <0xA5>] -> "日", but
    [<0xE6> <0x97> <0xA5> <0xE6>] -> "����". A run's text is final once a non-byte
    token (or the end of the sequence) closes it.
    """

    def __init__(self, backend: Tokenizer, skip_special_tokens: bool, skipped_ids: frozenset[int],
                 prompt_token_ids: list[int]) -> None:
        self._backend = backend
        self._skip_special_tokens = skip_special_tokens
        self._byte_fallback = bool(getattr(backend.model, "byte_fallback", False))
        self._skipped_ids = skipped_ids  # dropped by the decoder, so they do not end a byte run
        self._read_ids = self._prompt_context(prompt_token_ids)
        self._read_text = self._decode(self._read_ids)
        self._pending_ids: list[int] = []

    def push(self, token_id: int) -> str | None:
        self._pending_ids.append(token_id)
        if self._byte_fallback and self._ends_in_byte_run(self._pending_ids):
            return None
        window_text = self._decode(self._read_ids + self._pending_ids)
        num_read_chars = len(self._read_text)
        if len(window_text) <= num_read_chars or window_text.endswith(_REPLACEMENT_CHAR):
            return None  # nothing new yet, or a multi-byte character is still incomplete
        self._read_ids, self._pending_ids = self._pending_ids, []
        self._read_text = self._decode(self._read_ids)
        return window_text[num_read_chars:]

    def tail(self) -> str:
        if not self._pending_ids:
            return ""
        return self._decode(self._read_ids + self._pending_ids)[len(self._read_text):]

    def _ends_in_byte_run(self, token_ids: list[int]) -> bool:
        """True if the last id the decoder keeps is a byte token such as <0xE4>."""
        for token_id in reversed(token_ids):
            if token_id not in self._skipped_ids:
                token = self._backend.id_to_token(token_id) or ""
                return len(token) == 6 and token.startswith("<0x") and token.endswith(">")
        return False

    def _prompt_context(self, prompt_token_ids: list[int]) -> list[int]:
        """The last few prompt ids before the prompt's last closed character: output bytes
        joining an unfinished prompt character or byte run would change or vanish."""
        end = len(prompt_token_ids)
        for _ in range(min(end, _MAX_CONTEXT_SEARCH_TOKENS)):
            context = list(prompt_token_ids[max(0, end - _PROMPT_CONTEXT_TOKENS):end])
            if not (self._byte_fallback and self._ends_in_byte_run(context)) \
                    and not self._decode(context).endswith(_REPLACEMENT_CHAR):
                return context
            end -= 1
        return []

    def _decode(self, token_ids: list[int]) -> str:
        return self._backend.decode(token_ids, skip_special_tokens=self._skip_special_tokens)


class StopStrings:
    """A request's stop strings as one compiled regex, built once and shared by its sequences.

    ``find`` returns the earliest stop string in the text, and among those starting at the same
    place the first listed: stops ["ab", "a"] in "xab" -> (1, "ab"); ["a", "ab"] -> (1, "a").
    The regex branches on the first character and then tries that character's stops in list
    order (Python's ``re`` takes the first alternative that matches): "ab", "ac", "b" ->
    ``a(?:b|c)|b``. So each position costs one test per distinct first character plus one per
    stop sharing it, not one scan per stop string.
    """

    def __init__(self, stops: list[str]) -> None:
        assert stops and all(stops), "stop strings are non-empty"
        by_first_char: dict[str, list[str]] = {}
        for stop in dict.fromkeys(stops):  # duplicates dropped, first places kept
            by_first_char.setdefault(stop[0], []).append(re.escape(stop[1:]))
        self._regex = re.compile("|".join(f"{re.escape(first)}(?:{'|'.join(rests)})"
                                          for first, rests in by_first_char.items()))
        self.max_chars = max(len(stop) for stop in stops)

    def find(self, text: str, start: int = 0) -> tuple[int, str] | None:
        """(where, which) of the earliest stop string starting at ``start`` or later, else None."""
        match = self._regex.search(text, start)
        return None if match is None else (match.start(), match.group())


class IncrementalDetokenizer:
    """Text of one sequence's output tokens, cut at the first stop string.

    ``update`` takes the newly generated ids; ``output_text`` is the text so far;
    ``get_next_output_text`` is what to stream, never a partial stop string.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, prompt_token_ids: list[int],
                 params: SamplingParams, stop_strings: StopStrings | None = None) -> None:
        """``stop_strings``: the request's, built once for all its sequences (else built here from ``params``)."""
        self._params = params
        if stop_strings is None and params.stop_strings:
            stop_strings = StopStrings(params.stop_strings)
        self._stop_strings = stop_strings
        self._text = ""  # emitted output text, cut at the stop string once one is found
        self._num_streamed_chars = 0
        self._stopped = False
        self._num_tokens = 0  # stop strings count once min_tokens are out (as vLLM has it)
        max_stop_chars = stop_strings.max_chars if stop_strings is not None else 0
        # A stop string that will be included anyway needs no hold-back.
        self._hold_back_chars = 0 if params.include_stop_str_in_output else max(max_stop_chars - 1, 0)
        self._decoder: _StreamDecoder | _WindowDecoder | None = None
        if not params.detokenize:
            return
        backend = tokenizer.backend_tokenizer
        if isinstance(backend.decoder, decoders.ByteLevel):
            self._decoder = _StreamDecoder(backend, params.skip_special_tokens)
        else:
            skipped_ids = frozenset(tokenizer.all_special_ids if params.skip_special_tokens else ())
            self._decoder = _WindowDecoder(backend, params.skip_special_tokens, skipped_ids, prompt_token_ids)

    @property
    def output_text(self) -> str:
        """Full text so far, an unfinished trailing character included (as U+FFFD)."""
        if self._stopped or self._decoder is None:
            return self._text
        return self._text + self._decoder.tail()

    def update(self, new_token_ids: list[int]) -> str | None:
        """Appends generated ids; returns the stop string that ended the text, else None.

        Ids after a stop string are ignored: the sequence is finished.
        """
        if self._decoder is None or self._stopped:
            return None
        # One id at a time, so a stop string is found even when a later id in the same
        # update leaves an unfinished character behind it.
        for token_id in new_token_ids:
            piece = self._decoder.push(token_id)
            self._num_tokens += 1
            if piece:
                num_old_chars = len(self._text)
                self._text += piece
                if (self._stop_strings is not None and self._num_tokens >= self._params.min_tokens
                        and (stop := self._find_stop(num_old_chars)) is not None):
                    return stop
        return None

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text to stream now: all of it, or with ``delta`` only what was not returned before.

        While running, the last (longest stop string - 1) chars are held back so a stop
        string that is still forming is never streamed: stop "###", text "ab##" -> "ab".
        """
        if finished or self._stopped:
            text = self.output_text
            end = len(text)
        else:
            text = self._text
            end = max(len(text) - self._hold_back_chars, self._num_streamed_chars)
        start = self._num_streamed_chars if delta else 0
        self._num_streamed_chars = max(self._num_streamed_chars, end)
        return text[start:end]

    def _find_stop(self, num_old_chars: int) -> str | None:
        """Earliest stop string in the new text (it may start in older text); cuts the text there."""
        # A stop string spanning the old/new boundary starts at most (longest stop - 1) chars back;
        # one that starts there and ends in the old text cannot exist: it would have stopped us before.
        found = self._stop_strings.find(self._text, max(0, num_old_chars - self._stop_strings.max_chars + 1))
        if found is None:
            return None
        best_start, best_stop = found
        end = best_start + len(best_stop) if self._params.include_stop_str_in_output else best_start
        self._text = self._text[:end]
        self._stopped = True
        return best_stop
