"""How the router goes on with a broken stream (router/resume.py), as plain data: events in, bodies and bytes out."""

from __future__ import annotations

import json

import pytest

from splitfuse.router.resume import (DONE, NotResumable, Progress, StreamLog, continuation_body,
                                     continuation_rewriter, finish_events, parse_events, progress_of)


def sse(payload) -> bytes:
    return b"data: " + (payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()) + b"\n\n"


def completion_event(text: str, finish_reason=None, **extra) -> dict:
    return {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason}], **extra}


def chat_event(delta: dict, finish_reason=None) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def test_the_log_relays_whole_events_only_and_keeps_what_it_relayed():
    log = StreamLog()
    first, second = sse(completion_event(" Paris")), sse(completion_event("."))
    assert log.feed(first[:10]) == b""  # half an event waits
    assert log.feed(first[10:] + second[:5]) == first
    assert log.feed(second[5:]) == second
    assert log.feed(b"data: {\"half") == b""
    log.drop_pending()  # the upstream broke off: the half event is lost, never relayed
    assert log.events() == [completion_event(" Paris"), completion_event(".")]
    assert log.feed(b"data: [DONE]") == b"" and log.flush() == b"data: [DONE]"  # an unterminated end goes out as is


def test_crlf_events_comments_and_multiline_data_parse():
    data = b": ping\r\n\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\ndata: [DONE]\r\n\r\n"
    log = StreamLog()
    assert log.feed(data) == data
    assert parse_events(data) == [{"a": 1}, DONE]


def test_progress_counts_the_events_that_carried_text_or_the_streamed_usage():
    events = [completion_event(" The"), completion_event(""), completion_event(" capital")]
    assert progress_of("completions", events) == Progress(" The capital", 2, False, False, events[0])
    with_usage = [completion_event(" The", usage={"prompt_tokens": 4, "completion_tokens": 3})]
    assert progress_of("completions", with_usage).num_tokens == 3
    chat = [chat_event({"role": "assistant", "content": ""}), chat_event({"content": "Hi"}),
            chat_event({}, finish_reason="stop"), DONE]
    assert progress_of("chat", chat) == Progress("Hi", 1, True, True, chat[0])


def test_a_completion_goes_on_from_its_prompt_plus_the_streamed_text_with_the_budget_left():
    progress = Progress(" Paris is", 2, False, False, None)
    body = {"model": "m", "prompt": "The capital of France:", "max_tokens": 10, "min_tokens": 1, "stream": True,
            "temperature": 0}
    assert continuation_body("completions", body, progress) == {
        **body, "prompt": "The capital of France: Paris is", "max_tokens": 8, "min_tokens": 0}
    assert body["prompt"] == "The capital of France:"  # the client's body is not touched
    assert continuation_body("completions", {**body, "prompt": ["one"]}, progress)["prompt"] == "one Paris is"
    assert continuation_body("completions", {**body, "max_tokens": 2}, progress) is None  # budget spent
    nothing_yet = Progress("", 0, False, False, None)
    assert continuation_body("completions", body, nothing_yet) == body


def test_a_chat_goes_on_as_an_open_assistant_message():
    progress = Progress("The capital", 2, False, False, None)
    body = {"model": "m", "messages": [{"role": "user", "content": "Capital of France?"}],
            "max_completion_tokens": 5, "stream": True}
    assert continuation_body("chat", body, progress) == {
        **body, "messages": [{"role": "user", "content": "Capital of France?"},
                             {"role": "assistant", "content": "The capital"}],
        "max_completion_tokens": 3, "add_generation_prompt": False, "continue_final_message": True}
    already_open = {**body, "messages": [*body["messages"], {"role": "assistant", "content": "Well,"}],
                    "add_generation_prompt": False, "continue_final_message": True}
    resumed = continuation_body("chat", already_open, progress)
    assert resumed["messages"][-1] == {"role": "assistant", "content": "Well,The capital"}
    assert len(resumed["messages"]) == 2


@pytest.mark.parametrize("body, why", [
    ({"prompt": "x", "n": 2}, "several choices"),
    ({"prompt": "x", "best_of": 3}, "several choices"),
    ({"prompt": "x", "echo": True}, "echoes its prompt"),
    ({"prompt": [1, 2, 3]}, "only a completion whose prompt is one text"),
    ({"prompt": ["a", "b"]}, "only a completion whose prompt is one text"),
])
def test_streams_that_cannot_go_on_elsewhere_say_why(body, why):
    with pytest.raises(NotResumable, match=why):
        continuation_body("completions", body, Progress("y", 1, False, False, None))


def test_the_continuations_events_read_as_the_first_stream():
    first = chat_event({"role": "assistant", "content": ""})
    rewrite = continuation_rewriter("chat", Progress("The capital", 2, False, False, first))
    opening = {**chat_event({"role": "assistant", "content": ""}), "id": "chatcmpl-2", "created": 9}
    assert rewrite(sse(opening)) == b""  # the client has its role already
    token = {**chat_event({"content": " is"}), "id": "chatcmpl-2", "created": 9, "model": "other"}
    usage = {**chat_event({}), "id": "chatcmpl-2", "choices": [],
             "usage": {"prompt_tokens": 14, "completion_tokens": 3, "total_tokens": 17}}
    out = parse_events(rewrite(sse(token) + sse(usage) + sse(DONE)))
    assert out == [chat_event({"content": " is"}),
                   {**chat_event({}), "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5,
                                                              "total_tokens": 17}},
                   DONE]


def test_a_spent_budget_ends_the_stream_with_a_length_finish():
    first = completion_event(" Paris")
    assert parse_events(finish_events("completions", Progress(" Paris", 1, False, False, first))) == [
        {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
         "choices": [{"index": 0, "finish_reason": "length", "text": ""}]}, DONE]
