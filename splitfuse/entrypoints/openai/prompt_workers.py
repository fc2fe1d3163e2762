"""Requests -> prompt token ids off the event loop and off the engine thread: a few threads, each with its own
tokenizer copy and its own chat-template process, and the character bound checked before any of that runs.

Why threads and processes: HF fast tokenizers release the GIL while they work, so a thread is enough
for them (each thread gets its own copy: two threads on one instance raise "Already borrowed"). A jinja
template is Python code that holds the GIL and can loop without end, so it runs in a process
(``template_sandbox.py``) that is interrupted after its time limit and killed if even that fails.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import select
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from splitfuse.entrypoints.openai import template_sandbox

logger = logging.getLogger(__name__)

_SANDBOX_SCRIPT = os.path.abspath(template_sandbox.__file__)
# The worker interrupts itself at the time limit; this much later the server stops waiting and kills it.
_KILL_GRACE_S = 1.0
# How many characters one token can cover after a Unicode normalizer: NFC/NFKC compose at most 4 code
# points into one (U+1F82 is 4 code points in NFD), and no NFD/NFKD decomposition is empty.
_UNICODE_NORMALIZATION_SHRINK = 4
_UNICODE_NORMALIZERS = frozenset({"NFC", "NFD", "NFKC", "NFKD"})
# Normalizers and pre-tokenizers that never drop input text (they only add, split or map 1:1).
_KEEPING_NORMALIZERS = frozenset({"Prepend", "Lowercase"})
_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Digits", "UnicodeScripts"})
# Where no character bound holds, a template's output still stops somewhere: this many per token.
_FALLBACK_TEMPLATE_CHARS_PER_TOKEN = 1024


class RenderFailed(Exception):
    """A chat template could not be rendered; ``kind`` is "too_long", "timeout" or "invalid"."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


def max_chars_per_token(tokenizer: Any) -> Optional[int]:
    """The most characters of input text that one token can stand for; None where no such bound holds.

    A token whose string has k characters covers at most k characters of the text when the tokenizer
    keeps every input character in some token's string: byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen:
    one string character per input byte) and BPE with byte fallback or without fused unknowns
    (Llama 2, Mistral: an unknown character becomes byte tokens like "<0xE2>", or one "<unk>" each).
    A Unicode normalizer can shrink the text first (NFC: at most 4 code points into one). Anything
    that can drop text (a WordPiece "[UNK]" for a whole word, fused unknowns, Strip, whitespace
    splitting, SentencePiece's precompiled charmap) bounds nothing: None.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    pre_tokenizers = _components(spec.get("pre_tokenizer"))
    if pre_tokenizers is None or model.get("type") != "BPE":
        return None
    byte_level = any(p["type"] == "ByteLevel" for p in pre_tokenizers)
    if model.get("fuse_unk") and model.get("unk_token") and not (byte_level or model.get("byte_fallback")):
        return None
    if not all(_keeps_text(p, _KEEPING_PRE_TOKENIZERS) for p in pre_tokenizers):
        return None
    normalizers = _components(spec.get("normalizer"))
    if normalizers is None:
        return None
    shrink = 1
    for normalizer in normalizers:
        if normalizer["type"] in _UNICODE_NORMALIZERS:
            shrink = _UNICODE_NORMALIZATION_SHRINK
        elif not _keeps_text(normalizer, _KEEPING_NORMALIZERS):
            return None
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return longest * shrink


def _components(spec: Optional[dict]) -> Optional[list[dict]]:
    """A normalizer / pre-tokenizer spec as a flat list ([] for none); None if it has an unknown shape."""
    if spec is None:
        return []
    if spec.get("type") == "Sequence":
        parts = spec.get("normalizers", spec.get("pretokenizers"))
        if not isinstance(parts, list):
            return None
        flat: list[dict] = []
        for part in parts:
            inner = _components(part)
            if inner is None:
                return None
            flat.extend(inner)
        return flat
    return [spec]


def _keeps_text(component: dict, keeping: frozenset[str]) -> bool:
    kind = component["type"]
    if kind in keeping:
        return True
    if kind in ("Split", "Punctuation"):
        return component.get("behavior") != "Removed"
    if kind == "Replace":  # " " -> "▁" (Llama 2) keeps the length; a shorter replacement would not
        pattern = component.get("pattern") or {}
        return "String" in pattern and len(component.get("content", "")) >= len(pattern["String"])
    return False


class _TemplateProcess:
    """One ``template_sandbox.py`` process and its pipes; used by one thread at a time."""

    def __init__(self, max_output_chars: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        # -I: no user site, no environment variables, no script directory on sys.path.
        self._process = subprocess.Popen([sys.executable, "-I", _SANDBOX_SCRIPT, str(max_output_chars), str(timeout_s)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    @property
    def pid(self) -> int:
        return self._process.pid

    def render(self, template: str, variables: dict[str, Any]) -> str:
        """The rendered text; raises RenderFailed. After a timeout or a crash the process is gone (``alive`` False)."""
        job = json.dumps({"template": template, "variables": variables}, ensure_ascii=False).encode("utf-8")
        assert self._process.stdin is not None and self._process.stdout is not None
        try:
            self._process.stdin.write(job + b"\n")
            self._process.stdin.flush()
            ready, _, _ = select.select([self._process.stdout], [], [], self.timeout_s + _KILL_GRACE_S)
            line = self._process.stdout.readline() if ready else b""
        except (OSError, ValueError):  # a broken pipe, or close() closed it under us
            line = b""
        if not line.endswith(b"\n"):
            timed_out = self.alive
            self.kill()
            if timed_out:
                raise RenderFailed(f"the chat template took longer than {self.timeout_s:g} s to render", "timeout")
            raise RenderFailed("the chat template process exited while rendering", "crashed")
        reply = json.loads(line)
        if "error" in reply:
            raise RenderFailed(reply["error"], reply["kind"])
        return reply["text"]

    def kill(self) -> None:
        if self.alive:
            self._process.kill()
        self._process.wait()
        for pipe in (self._process.stdin, self._process.stdout):
            if pipe is not None:
                pipe.close()


class PromptWorkers:
    """``num_workers`` threads that render chat templates and tokenize prompts.

    Each thread owns a tokenizer copy and (from its first render on) a template process; a process
    that timed out or crashed is replaced at that thread's next render. ``close`` kills the processes.

    ``max_prompt_chars``: no text longer than this can be a prompt that fits the context, because a
    prompt has at most max_model_len - 1 tokens, each standing for at most ``chars_per_token``
    characters (``max_chars_per_token``); None where the tokenizer gives no such bound. Callers
    refuse longer text before it reaches a worker, and a template's output stops there.
    """

    def __init__(self, tokenizer: Any, max_model_len: int, *, num_workers: int, template_timeout_s: float) -> None:
        self._tokenizer = tokenizer
        self.chars_per_token = max_chars_per_token(tokenizer) if tokenizer is not None else None
        self.max_prompt_chars = None if self.chars_per_token is None else (max_model_len - 1) * self.chars_per_token
        self._max_template_output_chars = self.max_prompt_chars or max_model_len * _FALLBACK_TEMPLATE_CHARS_PER_TOKEN
        self._template_timeout_s = template_timeout_s
        self._local = threading.local()
        self._processes: list[_TemplateProcess] = []  # every process started, for close()
        self._lock = threading.Lock()
        self._closed = False
        self._executor = ThreadPoolExecutor(num_workers, thread_name_prefix="splitfuse-prompt",
                                            initializer=self._init_thread)

    def _init_thread(self) -> None:
        self._local.tokenizer = copy.deepcopy(self._tokenizer)
        self._local.process = None

    async def tokenize(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return await self._run(self._tokenize, text, add_special_tokens)

    async def render(self, template: str, variables: dict[str, Any]) -> str:
        """The template's text for ``variables``; raises RenderFailed."""
        return await self._run(self._render, template, variables)

    async def _run(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self._local.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _render(self, template: str, variables: dict[str, Any]) -> str:
        process = self._local.process
        if process is None or not process.alive:
            process = self._local.process = self._start_process()
        return process.render(template, variables)

    def _start_process(self) -> _TemplateProcess:
        with self._lock:
            if self._closed:
                raise RenderFailed("the server is shutting down", "unavailable")
            process = _TemplateProcess(self._max_template_output_chars, self._template_timeout_s)
            self._processes = [p for p in self._processes if p.alive] + [process]
            return process

    def process_ids(self) -> list[int]:
        """The pids of the template processes running now."""
        with self._lock:
            return [p.pid for p in self._processes if p.alive]

    def close(self) -> None:
        """Stop the threads (queued work is dropped) and kill the template processes."""
        with self._lock:
            self._closed = True
            processes, self._processes = self._processes, []
        self._executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.kill()
