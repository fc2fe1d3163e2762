"""Tool calling's pure parts: the plan from tools and tool_choice, the grammar a forced choice gets, parsing
Hermes and Llama-3 JSON calls, and streaming deltas that never show a call's text as content."""

from __future__ import annotations

import json

import pytest

from splitfuse.entrypoints.openai.errors import OpenAIError
from splitfuse.entrypoints.openai.protocol import ChatTool, NamedToolChoice
from splitfuse.entrypoints.openai.tool_calls import (ToolCallStream, hermes_text, parse_tool_calls, reply_of,
                                                     resolve_tools)
from splitfuse.sample.grammar import closed_objects

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [ChatTool(type="function", function={"name": "get_weather", "parameters": WEATHER}),
         ChatTool(type="function", function={"name": "now"})]


def named(name: str) -> NamedToolChoice:
    return NamedToolChoice(type="function", function={"name": name})


def calls_of(calls) -> list[tuple[str, dict]]:
    return [(call.name, json.loads(call.arguments)) for call in calls]


def test_the_plan_and_the_grammar_each_choice_puts_on_the_reply():
    assert resolve_tools(None, None).mode == "none"
    assert resolve_tools(TOOLS, None).mode == "auto" and resolve_tools(TOOLS, None).constraint is None
    assert resolve_tools(TOOLS, "none").renders_tools is False
    plan = resolve_tools(TOOLS, named("get_weather"))
    assert (plan.mode, plan.named, json.loads(plan.constraint.json)) == ("named", "get_weather", WEATHER)
    required = json.loads(resolve_tools(TOOLS, "required").constraint.json)
    assert required == {"type": "array", "minItems": 1, "items": {"anyOf": [
        {"type": "object", "properties": {"name": {"const": "get_weather"}, "parameters": WEATHER},
         "required": ["name", "parameters"], "additionalProperties": False},
        {"type": "object", "properties": {"name": {"const": "now"}, "parameters": {"type": "object", "properties": {}}},
         "required": ["name", "parameters"], "additionalProperties": False}]}}
    assert json.loads(resolve_tools(TOOLS, "required", parallel=False).constraint.json)["maxItems"] == 1


@pytest.mark.parametrize("tools, choice, param, message", [
    (TOOLS, named("get_time"), "tool_choice",
     "tool_choice names the function 'get_time', which is not among the tools ('get_weather', 'now')"),
    (None, "required", "tool_choice", "tool_choice 'required' needs tools"),
    (None, named("now"), "tool_choice", "tool_choice names the function 'now', which is not among the tools (none)"),
    (TOOLS + TOOLS[:1], "auto", "tools", "tools[2]: the function name 'get_weather' is used twice"),
    ([ChatTool(type="function", function={"name": "f", "parameters": {"type": "frobnicate"}})], "auto", "tools",
     "tools[0] (f): parameters: invalid JSON schema: Invalid type: frobnicate"),
])
def test_wrong_tools_or_tool_choice_are_400s_naming_the_field(tools, choice, param, message):
    with pytest.raises(OpenAIError) as error:
        resolve_tools(tools, choice)
    assert (error.value.status, error.value.param, error.value.message) == (400, param, message)


def test_hermes_calls_are_parsed_anywhere_and_the_text_around_them_stays_content():
    functions = resolve_tools(TOOLS, "auto").functions
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "now", "arguments": {}}</tool_call>')
    content, calls = parse_tool_calls(text, functions)
    assert content == "Let me check." and calls_of(calls) == [("get_weather", {"city": "Paris"}), ("now", {})]
    # An unknown function or broken JSON is not a call: it stays text.
    unknown = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    assert parse_tool_calls(unknown, functions) == (unknown, [])
    assert parse_tool_calls('<tool_call>{"name": "now", </tool_call>', functions)[1] == []
    # Arguments written as JSON text are read too.
    assert calls_of(parse_tool_calls('<tool_call>{"name": "now", "arguments": "{}"}</tool_call>', functions)[1]) == [
        ("now", {})]


def test_llama3_json_calls_plain_after_the_python_tag_listed_or_joined_by_semicolons():
    functions = resolve_tools(TOOLS, "auto").functions
    one = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert calls_of(parse_tool_calls(one, functions)[1]) == [("get_weather", {"city": "Oslo"})]
    assert parse_tool_calls(f"<|python_tag|>{one}", functions)[0] is None
    two = [("get_weather", {"city": "Oslo"}), ("now", {})]
    assert calls_of(parse_tool_calls(f'[{one}, {{"name": "now", "parameters": {{}}}}]', functions)[1]) == two
    assert calls_of(parse_tool_calls(f'{one}; {{"name": "now", "parameters": {{}}}}', functions)[1]) == two
    assert parse_tool_calls('{"answer": 42}', functions) == ('{"answer": 42}', [])


def test_a_forced_reply_is_its_calls_and_a_cut_one_stays_text():
    plan = resolve_tools(TOOLS, named("get_weather"))
    assert [(c.name, c.arguments) for c in reply_of('{"city": "Rome"}', plan)[1]] == [("get_weather", '{"city": "Rome"}')]
    assert reply_of('{"city": "Ro', plan) == ('{"city": "Ro', [])
    required = resolve_tools(TOOLS, "required")
    text = '[{"name": "now", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Rome"}}]'
    content, calls = reply_of(text, required)
    assert content is None and calls_of(calls) == [("now", {}), ("get_weather", {"city": "Rome"})]
    one = resolve_tools(TOOLS, "auto", parallel=False)
    two_calls = '<tool_call>{"name": "now", "arguments": {}}</tool_call><tool_call>{"name": "now", "arguments": {}}</tool_call>'
    assert len(reply_of(two_calls, one)[1]) == 1


def stream_all(plan, pieces: list[str]) -> tuple[list[str], str, list[dict]]:
    stream = ToolCallStream(plan)
    shown = [stream.add(piece) for piece in pieces]
    rest, calls = stream.finish()
    return shown, rest, calls


def test_streamed_text_goes_out_at_once_up_to_a_call_which_goes_out_whole_at_the_end():
    plan = resolve_tools(TOOLS, "auto")
    pieces = ["Sure", ", checking", ". <tool", '_call>{"name": "now", ', '"arguments": {}}</tool_call>']
    shown, rest, calls = stream_all(plan, pieces)
    assert shown == ["Sure", ", checking", ". ", "", ""]  # "<tool" might open a call: held
    assert rest == "" and [(c["index"], c["type"], c["function"]) for c in calls] == [
        (0, "function", {"name": "now", "arguments": "{}"})]
    assert calls[0]["id"].startswith("call_")
    # A held "<tool" that opens no call comes out as text.
    assert stream_all(plan, ["a <tool", "box> b"]) == (["a ", "<toolbox> b"], "", [])
    # Llama-3 JSON: a reply opening with "{" is held to the end.
    shown, rest, calls = stream_all(plan, ['{"name": "get_weather", ', '"parameters": {"city": "Oslo"}}'])
    assert shown == ["", ""] and rest == "" and calls[0]["function"]["name"] == "get_weather"
    shown, rest, calls = stream_all(plan, ["{not", " a call}"])
    assert (shown, rest, calls) == (["", ""], "{not a call}", [])
    # tool_choice none streams everything as it comes.
    assert stream_all(resolve_tools(TOOLS, "none"), ["<tool_call>", "x"]) == (["<tool_call>", "x"], "", [])


def test_hermes_text_writes_what_parse_reads_back():
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}}]
    text = hermes_text(calls)
    assert text == '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Lima\\"}"}\n</tool_call>'
    assert calls_of(parse_tool_calls(text, resolve_tools(TOOLS, "auto").functions)[1]) == [
        ("get_weather", {"city": "Lima"})]


def test_closed_objects_forbids_unlisted_keys_unless_the_schema_says_otherwise():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                                               "c": {"type": "array", "items": {"properties": {}}}},
              "$defs": {"d": {"properties": {"e": {}}, "additionalProperties": True}}}
    assert closed_objects(schema) == {
        "type": "object", "additionalProperties": False,
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}, "additionalProperties": False},
                       "c": {"type": "array", "items": {"properties": {}, "additionalProperties": False}}},
        "$defs": {"d": {"properties": {"e": {}}, "additionalProperties": True}}}
