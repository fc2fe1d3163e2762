"""Tool calling through the server with the official openai client, streaming and not.

The default model (SmolLM2-135M-Instruct, whose template knows no tools) must call a function when
tool_choice is required or names one: each call is valid for its function's schema (jsonschema).
With tool_choice auto, a reply is forced into the Hermes format by a regex, so the parser's work on a
real reply is what is checked. A template that reads ``tools`` renders exactly as transformers' own
apply_chat_template does, tool calls and results included.
"""

from __future__ import annotations

import json
import re
import shutil

import jsonschema
import openai
import pytest
import transformers

from splitfuse.config import EngineConfig
from splitfuse.engine.async_engine import AsyncLLMEngine
from splitfuse.entrypoints.openai.protocol import ChatTool
from splitfuse.entrypoints.openai.server import ServerThread, build_app
from splitfuse.entrypoints.openai.tool_calls import resolve_tools, tools_system_prompt

pytestmark = pytest.mark.timeout(600)

MODEL = "smollm2"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def rendered_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    """transformers' rendering of a chat, tokenized as the server does (the template wrote the specials)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def serve(checkpoint: str):
    engine = AsyncLLMEngine.from_config(EngineConfig.from_kwargs(model=checkpoint))
    return ServerThread(build_app(engine, [MODEL]))


@pytest.fixture(scope="module")
def client(smollm2_default_dir):
    with serve(smollm2_default_dir) as running:
        with openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120) as api:
            yield api


def streamed_calls(stream) -> tuple[str, list[dict], str]:
    """(content, calls, finish_reason) put together from the deltas, as a client does."""
    content, calls, finish_reason = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish_reason = choice.finish_reason or finish_reason
    return content, [calls[i] for i in sorted(calls)], finish_reason


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_choice_always_calls_with_valid_arguments_streamed_or_not(client, tool_choice):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice=tool_choice,
                                           temperature=0, max_tokens=80)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    if isinstance(tool_choice, dict):
        assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]

    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice=tool_choice,
                                            temperature=0, max_tokens=80, stream=True)
    content, calls, finish_reason = streamed_calls(stream)
    assert (content, finish_reason) == ("", "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls]


def test_sampled_forced_calls_are_valid_too(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required",
                                           temperature=1.0, seed=5, n=4, max_tokens=120)
    for choice in reply.choices:
        assert choice.finish_reason in ("tool_calls", "length")
        if choice.finish_reason == "tool_calls":
            for call in choice.message.tool_calls:
                jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert sum(c.finish_reason == "tool_calls" for c in reply.choices) >= 3


HERMES_REPLY = ('I will look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
                '"unit": "celsius"}}\n</tool_call>')


def test_auto_parses_a_hermes_reply_into_tool_calls_and_keeps_the_text(client):
    # The regex makes the model write exactly this reply; the parser turns it into a call.
    forced = {"guided_regex": re.sub(r"([.{}\[\]()*+?|^$\\])", r"\\\1", HERMES_REPLY)}
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="auto",
                                           temperature=0, max_tokens=80, extra_body=forced)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "I will look."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})]
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="auto",
                                            temperature=0, max_tokens=80, stream=True, extra_body=forced)
    content, calls, finish_reason = streamed_calls(stream)
    assert (content.strip(), finish_reason) == ("I will look.", "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris", "unit": "celsius"})]
    # tool_choice none: the same reply is plain text.
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=80, extra_body=forced)
    assert plain.choices[0].message.content == HERMES_REPLY and not plain.choices[0].message.tool_calls


def test_a_tool_result_goes_back_and_the_model_answers(client, smollm2_default_dir):
    first = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           temperature=0, max_tokens=80)
    call = first.choices[0].message.tool_calls[0]
    result = '{"temperature": 21}'
    messages = QUESTION + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                           {"role": "tool", "tool_call_id": call.id, "content": result}]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=16)
    assert second.choices[0].message.content
    # A template without tools sees them as Hermes text: the system message, the call and the result.
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_default_dir)
    arguments = call.function.arguments
    expected = rendered_ids(tokenizer, [
        {"role": "system", "content": tools_system_prompt(resolve_tools([ChatTool(**t) for t in TOOLS], "auto"))},
        QUESTION[0],
        {"role": "assistant", "content": '<tool_call>\n' + json.dumps({"name": "get_weather", "arguments": arguments})
                                         + "\n</tool_call>"},
        {"role": "user", "content": f"<tool_response>\n{result}\n</tool_response>"}])
    assert second.usage.prompt_tokens == len(expected)


@pytest.mark.parametrize("extra, param, message", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice",
     "tool_choice names the function 'get_time', which is not among the tools ('get_weather', 'add')"),
    ({"tool_choice": "required"}, "tool_choice", "tool_choice 'required' needs tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", ""),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frobnicate"}}}]}, "tools",
     "tools[0] (f): parameters: invalid JSON schema: Invalid type: frobnicate"),
    ({"tools": [{"type": "retrieval"}]}, "tools", ""),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "tool_choice 'required' constrains the reply already"),
])
def test_bad_tools_and_tool_choice_are_400s(client, extra, param, message):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5, extra_body=extra)
    body = error.value.body
    assert body["param"].startswith(param) and body["message"].startswith(message), body


TOOL_TEMPLATE = """{%- if tools %}<|im_start|>system
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_a_template_that_reads_tools_renders_as_transformers_does(llama_ckpt, tmp_path):
    checkpoint = tmp_path / "tool_llama"
    shutil.copytree(llama_ckpt, checkpoint)
    (checkpoint / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    messages = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    hf_messages = [*messages[:1], {**messages[1], "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]}, messages[2]]
    tools = TOOLS[1:]  # the tiny model's context is 512 tokens
    expected = rendered_ids(tokenizer, hf_messages, tools=tools)
    with serve(str(checkpoint)) as running:
        with openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0) as api:
            reply = api.chat.completions.create(model=MODEL, messages=messages, tools=tools, temperature=0, max_tokens=4)
    assert reply.usage.prompt_tokens == len(expected)
    assert "<tools>" in tokenizer.decode(expected)
