"""Going on with a stream whose backend broke off midway: the same request again, extended by what was streamed.

The router does not tokenize, so it goes on from text: a completion's prompt becomes the prompt
plus the text streamed so far; a chat gets that text as an open assistant message
(``continue_final_message``, which splitfuse and vLLM serve). ``max_tokens`` shrinks by the tokens
streamed, counted as the events that carried text (one engine step each), or taken from the
usage in the events when the backend streams it. Greedy output is the no-failure output wherever
the streamed text tokenizes back into the tokens that made it (a model's own text does); a
sampled stream goes on without error.

Only what the client was sent counts: the relay passes on complete events only (``StreamLog``),
so a backend that dies halfway through an event leaves nothing half-written in the client's stream.
The events of the continuation are rewritten to read as the same stream: the first stream's
``id``, ``created`` and ``model``, no second chat role opening, usage counted over the whole answer.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

DONE = "[DONE]"
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n")


def _end_of_last_event(data: bytes) -> int:
    """How many leading bytes of ``data`` are complete SSE events (0 when none is)."""
    return max((index + len(end) for end in _EVENT_ENDS if (index := data.rfind(end)) >= 0), default=0)


class StreamLog:
    """The complete events relayed so far, and the start of one not yet complete.

    ``feed`` takes the upstream's bytes as they come and gives back what may go to the client now:
    whole events only, each passed through ``rewrite`` when one is set (a continuation's events).
    """

    def __init__(self) -> None:
        self._relayed: list[bytes] = []
        self._pending = b""
        self.rewrite: Optional[Callable[[bytes], bytes]] = None

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk if self._pending else chunk
        end = _end_of_last_event(data)
        self._pending = data[end:]
        return self._relay(data[:end])

    def flush(self) -> bytes:
        """The upstream ended: whatever it left unterminated goes out as it is."""
        data, self._pending = self._pending, b""
        return self._relay(data)

    def drop_pending(self) -> None:
        """The upstream broke off: the incomplete event it left is lost with it."""
        self._pending = b""

    def _relay(self, data: bytes) -> bytes:
        if data and self.rewrite is not None:
            data = self.rewrite(data)
        if data:
            self._relayed.append(data)
        return data

    def events(self) -> list[Any]:
        """The payloads relayed so far: parsed JSON objects, and ``"[DONE]"``."""
        return parse_events(b"".join(self._relayed))


def parse_events(data: bytes) -> list[Any]:
    """The ``data:`` payloads of complete SSE events (comments and other fields skipped)."""
    payloads = []
    for block in data.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
        if not lines:
            continue
        payload = b"\n".join(lines).decode("utf-8", "replace")
        if payload == DONE:
            payloads.append(DONE)
            continue
        try:
            payloads.append(json.loads(payload))
        except json.JSONDecodeError:
            continue
    return payloads


def _choice_text(kind: str, choice: Any) -> str:
    if not isinstance(choice, dict):
        return ""
    if kind == "chat":
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else None
    else:
        text = choice.get("text")
    return text if isinstance(text, str) else ""


@dataclass(frozen=True)
class Progress:
    """How far a stream got, as its client saw it."""

    text: str  # the answer's text so far
    num_tokens: int  # tokens that made it
    finished: bool  # an event carried a finish_reason
    done: bool  # ``[DONE]`` went out
    first: Optional[dict]  # the first JSON event: its id, created and model name the stream


def progress_of(kind: str, events: list[Any]) -> Progress:
    texts: list[str] = []
    num_text_events = 0
    usage_tokens = 0
    finished = done = False
    first = None
    for event in events:
        if event == DONE:
            done = True
            continue
        if not isinstance(event, dict):
            continue
        if first is None:
            first = event
        usage = event.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            usage_tokens = max(usage_tokens, usage["completion_tokens"])
        choices = event.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            text = _choice_text(kind, choice)
            if text:
                texts.append(text)
                num_text_events += 1
            finished = finished or choice.get("finish_reason") is not None
    return Progress("".join(texts), max(num_text_events, usage_tokens), finished, done, first)


class NotResumable(Exception):
    """Why this stream cannot go on elsewhere (its message goes into the client's error event)."""


def continuation_body(kind: str, body: Any, progress: Progress) -> Optional[dict]:
    """The request that goes on from ``progress`` on another backend; None when the token budget is spent."""
    if not isinstance(body, dict):
        raise NotResumable("the request body is not a JSON object")
    if body.get("n", 1) != 1 or body.get("best_of", 1) not in (None, 1):
        raise NotResumable("a stream of several choices (n or best_of > 1) cannot go on elsewhere")
    if body.get("echo"):
        raise NotResumable("a stream that echoes its prompt cannot go on elsewhere")
    resumed = copy.deepcopy(body)
    count = progress.num_tokens
    for key in ("max_tokens", "max_completion_tokens"):
        limit = resumed.get(key)
        if type(limit) is int:
            if limit - count <= 0:
                return None
            resumed[key] = limit - count
    if type(resumed.get("min_tokens")) is int:
        resumed["min_tokens"] = max(0, resumed["min_tokens"] - count)
    if not progress.text:
        return resumed
    if kind == "chat":
        messages = resumed.get("messages")
        if not isinstance(messages, list) or not messages:
            raise NotResumable("the chat request has no messages")
        last = messages[-1]
        if resumed.get("continue_final_message") and isinstance(last, dict) and isinstance(last.get("content"), str):
            last["content"] += progress.text
        else:
            messages.append({"role": "assistant", "content": progress.text})
        resumed["add_generation_prompt"] = False
        resumed["continue_final_message"] = True
        return resumed
    prompt = resumed.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise NotResumable("only a completion whose prompt is one text can go on elsewhere (the router does not "
                           "tokenize)")
    resumed["prompt"] = prompt + progress.text
    return resumed


def continuation_rewriter(kind: str, progress: Progress) -> Callable[[bytes], bytes]:
    """Rewrites a continuation's events so the client's stream reads as one."""
    same = {key: progress.first[key] for key in ("id", "created", "model")
            if progress.first is not None and key in progress.first}
    count = progress.num_tokens

    def rewrite(data: bytes) -> bytes:
        out = []
        for event in parse_events(data):
            if event == DONE:
                out.append(b"data: [DONE]\n\n")
                continue
            if not isinstance(event, dict):
                continue
            event.update(same)
            if kind == "chat" and not _strip_role_opening(event):
                continue
            usage = event.get("usage")
            if isinstance(usage, dict) and type(usage.get("prompt_tokens")) is int:
                usage["prompt_tokens"] = max(0, usage["prompt_tokens"] - count)
                if type(usage.get("completion_tokens")) is int:
                    usage["completion_tokens"] += count
            out.append(b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")
        return b"".join(out)

    return rewrite


def _strip_role_opening(event: dict) -> bool:
    """Drops the ``role`` a chat stream opens with (the client has it); False when nothing is left to send."""
    choices = event.get("choices")
    if not isinstance(choices, list):
        return True
    kept = []
    for choice in choices:
        if isinstance(choice, dict) and isinstance(choice.get("delta"), dict) and "role" in choice["delta"]:
            delta = {k: v for k, v in choice["delta"].items() if k != "role"}
            if not delta.get("content") and choice.get("finish_reason") is None and not choice.get("logprobs") \
                    and not delta.get("tool_calls"):
                continue
            choice = {**choice, "delta": delta}
        kept.append(choice)
    event["choices"] = kept
    return bool(kept) or event.get("usage") is not None


def finish_events(kind: str, progress: Progress) -> bytes:
    """The end of a stream whose token budget ran out as its backend broke off: a length finish, then [DONE]."""
    event = {key: progress.first[key] for key in ("id", "object", "created", "model")
             if progress.first is not None and key in progress.first}
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
    if kind == "chat":
        choice["delta"] = {}
    else:
        choice["text"] = ""
    event["choices"] = [choice]
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\ndata: [DONE]\n\n"
