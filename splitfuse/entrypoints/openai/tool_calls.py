"""Tool calling on /v1/chat/completions: ``tools`` and ``tool_choice`` in, OpenAI ``tool_calls`` out.

- ``resolve_tools`` checks the request's tools and tool choice (a 400 names what is wrong) and says how the
  reply is made: ``auto`` generates freely and parses what the model wrote; ``required`` and a named
  function constrain the reply with the grammar engine (a JSON array of calls, or the function's
  arguments), so every call is valid JSON for its function's schema; ``none`` renders no tools.
- Tools reach the model through its chat template (``tools``, as transformers passes them). A template
  that never reads ``tools`` gets them in a Hermes-style system message instead, and assistant tool calls
  and tool results as text, so any chat model sees the functions and the conversation so far.
- ``parse_tool_calls`` reads the Hermes / Qwen format (``<tool_call>{"name": ..., "arguments": ...}
  </tool_call>``, any number) and Llama-3 JSON (``{"name": ..., "parameters": ...}``, optionally after
  ``<|python_tag|>``, one or several separated by ``;``). Calls to functions not in ``tools`` stay text.
- ``ToolCallStream`` turns a streamed reply into OpenAI-shaped deltas: text up to a possible call is
  streamed at once; a call goes out as one delta (id, name, arguments) when it is complete.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from splitfuse.entrypoints.openai.errors import OpenAIError
from splitfuse.sample.grammar import check as check_grammar
from splitfuse.sampling_params import StructuredOutputsParams

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
_HERMES_BLOCK = re.compile(re.escape(HERMES_OPEN) + r"(.*?)" + re.escape(HERMES_CLOSE), re.DOTALL)
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Function:
    name: str
    description: Optional[str]
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolPlan:
    """How one request's reply relates to its tools."""

    mode: str  # "none", "auto", "required" or "named"
    functions: dict[str, Function] = field(default_factory=dict)
    named: Optional[str] = None  # mode "named": the function every reply calls
    parallel: bool = True  # parallel_tool_calls: false allows one call per reply

    @property
    def constraint(self) -> Optional[StructuredOutputsParams]:
        """The grammar a required or named choice puts on the reply."""
        if self.mode == "named":
            return StructuredOutputsParams(json=self.functions[self.named].parameters)
        if self.mode == "required":
            calls = [{"type": "object", "properties": {"name": {"const": f.name}, "parameters": f.parameters},
                      "required": ["name", "parameters"], "additionalProperties": False}
                     for f in self.functions.values()]
            array = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
            return StructuredOutputsParams(json=array if self.parallel else {**array, "maxItems": 1})
        return None

    @property
    def renders_tools(self) -> bool:
        return self.mode != "none" and bool(self.functions)


def resolve_tools(tools: Optional[list[Any]], tool_choice: Union[str, Any, None], parallel: bool = True) -> ToolPlan:
    """The request's tool plan; OpenAIError (400) naming ``tools`` or ``tool_choice`` when they are wrong."""
    functions: dict[str, Function] = {}
    for index, tool in enumerate(tools or []):
        function = tool.function
        if function.name in functions:
            raise OpenAIError(f"tools[{index}]: the function name {function.name!r} is used twice", param="tools")
        parameters = function.parameters if function.parameters is not None else _NO_PARAMETERS
        try:
            check_grammar(StructuredOutputsParams(json=parameters))
        except ValueError as error:
            raise OpenAIError(f"tools[{index}] ({function.name}): parameters: {error}", param="tools") from None
        functions[function.name] = Function(function.name, function.description, parameters)
    if tool_choice is None:
        tool_choice = "auto" if functions else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise OpenAIError(f"tool_choice must be 'none', 'auto', 'required' or a named function, got "
                              f"{tool_choice!r}", param="tool_choice")
        if tool_choice != "none" and not functions:
            raise OpenAIError(f"tool_choice {tool_choice!r} needs tools", param="tool_choice")
        return ToolPlan(tool_choice, functions, parallel=parallel)
    name = tool_choice.function.name
    if name not in functions:
        known = ", ".join(repr(n) for n in functions) or "none"
        raise OpenAIError(f"tool_choice names the function {name!r}, which is not among the tools ({known})",
                          param="tool_choice")
    return ToolPlan("named", functions, name, parallel)


# ----- rendering ------------------------------------------------------------------------------------------


def template_tools(plan: ToolPlan) -> Optional[list[dict[str, Any]]]:
    """The ``tools`` a chat template sees (transformers' shape: OpenAI's tool objects)."""
    if not plan.renders_tools:
        return None
    return [{"type": "function", "function": {"name": f.name, "description": f.description or "",
                                              "parameters": f.parameters}} for f in plan.functions.values()]


def tools_system_prompt(plan: ToolPlan) -> str:
    """The Hermes-style instructions a template without tool support gets as (part of) its system message."""
    signatures = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in template_tools(plan) or [])
    return ("You may call functions to answer the user. The functions you may call are listed in <tools></tools>:\n"
            f"<tools>\n{signatures}\n</tools>\n"
            "To call a function, answer with a JSON object with its name and arguments inside <tool_call></tool_call>:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <arguments-object>}\n</tool_call>')


def hermes_text(tool_calls: list[dict[str, Any]]) -> str:
    """An assistant message's tool calls written the way the Hermes format reads them back."""
    blocks = []
    for call in tool_calls:
        function = call.get("function", {})
        blocks.append(f"{HERMES_OPEN}\n" + json.dumps({"name": function.get("name"),
                                                      "arguments": function.get("arguments")},
                                                     ensure_ascii=False) + f"\n{HERMES_CLOSE}")
    return "\n".join(blocks)


def template_reads_tools(template: str) -> bool:
    return re.search(r"\btools\b", template) is not None


# ----- parsing -----------------------------------------------------------------------------------------


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self, index: Optional[int] = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def _call_of(value: Any, functions: dict[str, Function]) -> Optional[ParsedCall]:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or value["name"] not in functions:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as JSON text already
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def parse_tool_calls(text: str, functions: dict[str, Function]) -> tuple[Optional[str], list[ParsedCall]]:
    """(content left, calls) of a reply written freely (tool_choice auto). No call parsed: (text, [])."""
    if HERMES_OPEN in text:
        calls, kept = [], []
        position = 0
        for match in _HERMES_BLOCK.finditer(text):
            try:
                call = _call_of(json.loads(match.group(1)), functions)
            except json.JSONDecodeError:
                call = None
            kept.append(text[position:match.start()] if call is not None else text[position:match.end()])
            position = match.end()
            if call is not None:
                calls.append(call)
        if calls:
            content = ("".join(kept) + text[position:]).strip()
            return content or None, calls
        return text, []
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    if body.startswith(("{", "[")):  # Llama-3 JSON: one call, a list of them, or several joined by ";"
        calls = []
        try:
            values = json.loads(body)
            values = values if isinstance(values, list) else [values]
        except json.JSONDecodeError:
            try:
                values = [json.loads(part) for part in body.split(";") if part.strip()]
            except json.JSONDecodeError:
                return text, []
        for value in values:
            call = _call_of(value, functions)
            if call is None:
                return text, []
            calls.append(call)
        return (None, calls) if calls else (text, [])
    return text, []


def constrained_calls(text: str, plan: ToolPlan) -> list[ParsedCall]:
    """The calls of a reply the grammar made (tool_choice required or named); [] if it was cut short."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []  # max_tokens cut the JSON: the reply stays text, finish_reason says length
    if plan.mode == "named":
        return [ParsedCall(plan.named, json.dumps(value, ensure_ascii=False))]
    return [ParsedCall(item["name"], json.dumps(item["parameters"], ensure_ascii=False)) for item in value]


def reply_of(text: str, plan: ToolPlan) -> tuple[Optional[str], list[ParsedCall]]:
    """(content, calls) of a finished reply under ``plan``."""
    if plan.mode in ("named", "required"):
        calls = constrained_calls(text, plan)
        return (None, calls) if calls else (text, [])
    if plan.mode == "auto":
        content, calls = parse_tool_calls(text, plan.functions)
        return content, calls if plan.parallel else calls[:1]
    return text, []


class ToolCallStream:
    """One choice's streamed reply -> (content delta, tool-call deltas) per step, under a tool plan.

    Text that may be the start of a call is held back: from ``<tool_call>`` (or a partial one at the end)
    on, and a whole reply that opens with ``{`` / ``[`` / ``<|python_tag|>`` (Llama-3 JSON). Calls go
    out when the reply ends (``finish``), each as one delta; held text that parsed as no call is content.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self._sent = 0  # chars of self.text already streamed as content
        self.calls: list[ParsedCall] = []

    def add(self, delta: str) -> str:
        """The content to stream now for ``delta``."""
        self.text += delta
        if self.plan.mode in ("named", "required"):
            return ""
        if self.plan.mode == "none":
            return self._release(len(self.text))
        stripped = self.text.lstrip()
        if self._sent == 0 and (not stripped or stripped.startswith(("{", "[")) or PYTHON_TAG.startswith(
                stripped[:len(PYTHON_TAG)]) or stripped.startswith(PYTHON_TAG)):
            return ""  # maybe Llama-3 JSON: wait for the whole reply
        cut = self.text.find(HERMES_OPEN, self._sent)
        if cut < 0:
            cut = len(self.text) - _partial_suffix(self.text, HERMES_OPEN)
        return self._release(cut)

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content still held, tool-call deltas) once the reply is complete."""
        content, self.calls = reply_of(self.text, self.plan)
        if not self.calls:
            return self._release(len(self.text)), []
        held = "" if content is None else content
        # Content already streamed stays streamed; what parsed as text outside the calls and was held goes now.
        already = self.text[:self._sent].strip()
        rest = held[len(already):] if held.startswith(already) else ""
        return rest, [call.to_openai(index) for index, call in enumerate(self.calls)]

    def _release(self, end: int) -> str:
        if end <= self._sent:
            return ""
        out, self._sent = self.text[self._sent:end], end
        return out


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker`` ("abc<tool" -> 5)."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0
