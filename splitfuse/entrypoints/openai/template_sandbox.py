"""Chat templates rendered in a limited jinja2 sandbox; run as a script, it is the worker process that renders them.

The environment is the one transformers' ``apply_chat_template`` builds (ImmutableSandboxedEnvironment,
trim_blocks, lstrip_blocks, loop controls, ``{% generation %}``, ``raise_exception``, ``strftime_now``,
``tojson(indent=...)``, ``dict``, ``namespace``), so a checkpoint's template renders here exactly as it
renders there. On top of the sandbox:

- ``range()`` holds at most jinja's ``MAX_RANGE`` (100,000) items: the sandbox's own limit;
- ``*`` and ``+`` refuse to build a string or list longer than the output limit, ``*`` and ``**``
  an integer of more than ``MAX_INT_BITS`` bits (``'x' * 200000000`` fails before it allocates);
- the output stops at ``max_output_chars`` (the server passes the longest prompt that could fit);

and in the worker process, which the server kills if it stops answering:

- each render has a wall-clock limit: SIGALRM interrupts any Python-level loop, nested or not;
- the address space is capped, so a template that allocates without bound gets a MemoryError.

This module imports only the standard library and jinja2, so the worker starts in a fraction of a second.
Protocol (one JSON object per line): the server writes ``{"template": str, "variables": {...}}``;
the worker answers ``{"text": str}`` or ``{"error": str, "kind": "too_long" | "timeout" | "invalid"}``.
"""

from __future__ import annotations

import collections
import json
import sys
from datetime import datetime
from typing import Any, Optional

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_INT_BITS = 1 << 16  # ints this big already print as ~20,000 digits; bigger ones only burn time
MEMORY_LIMIT_BYTES = 1 << 30  # address space the worker may add to what it holds at start
_COMPILED_CACHE_SIZE = 16  # the model's template plus a few request templates (when they are trusted)


class RenderError(Exception):
    """A template that cannot be rendered; ``kind`` is "too_long", "timeout" or "invalid"."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


class _Timeout(BaseException):
    """Raised by SIGALRM inside a render. A BaseException, so no ``except Exception`` in a template call swallows it."""


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
            separators: Optional[tuple[str, str]] = None, sort_keys: bool = False) -> str:
    # transformers' override: jinja's own tojson escapes HTML characters and takes no options.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict(...)`` and ``dict.fromkeys(...)`` without the dict type itself (no type attributes to climb)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace, refusing underscore names (as transformers does: no way to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja's signature trick: namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """transformers' ``{% generation %}...{% endgeneration %}`` (marks assistant text for training): the body as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _sized(value: Any) -> bool:
    return isinstance(value, (str, list, tuple))


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment, with ``*``, ``+`` and ``**`` checked before they run."""

    intercepted_binops = frozenset({"*", "+", "**"})

    def __init__(self, max_output_chars: int) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True,
                         extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        self.max_output_chars = max_output_chars
        self.filters["tojson"] = _tojson
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                            namespace=_TemplateNamespace)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            self._check_repeat(left, right)
        elif operator == "+" and _sized(left) and _sized(right):
            self._check_length(len(left) + len(right))
        elif operator == "**" and _is_int(left) and _is_int(right) and right > 0:
            self._check_int_bits(max(abs(left).bit_length(), 1) * right)
        return super().call_binop(context, operator, left, right)

    def _check_repeat(self, left: Any, right: Any) -> None:
        for sequence, count in ((left, right), (right, left)):
            if _sized(sequence) and _is_int(count):
                self._check_length(len(sequence) * count)
                return
        if _is_int(left) and _is_int(right):
            self._check_int_bits(abs(left).bit_length() + abs(right).bit_length())

    def _check_length(self, length: int) -> None:
        if length > self.max_output_chars:  # a string that long could not be part of any prompt that fits
            raise RenderError(f"the template builds a string or list of {length} items; "
                              f"the limit is {self.max_output_chars}", "too_long")

    def _check_int_bits(self, bits: int) -> None:
        if bits > MAX_INT_BITS:
            raise SecurityError(f"the template computes an integer of about {bits} bits; the limit is {MAX_INT_BITS}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int)


class TemplateRenderer:
    """Compiles (cached by source) and renders templates, stopping once the output passes ``max_output_chars``."""

    def __init__(self, max_output_chars: int) -> None:
        self.environment = LimitedSandbox(max_output_chars)
        self.max_output_chars = max_output_chars
        self._compiled: collections.OrderedDict[str, jinja2.Template] = collections.OrderedDict()

    def render(self, source: str, variables: dict[str, Any]) -> str:
        """The rendered text; raises RenderError (never anything else, except a _Timeout from the alarm)."""
        try:
            template = self._compile(source)
            parts, size = [], 0
            for chunk in template.generate(**variables):
                size += len(chunk)
                if size > self.max_output_chars:
                    raise RenderError(f"its output passes {self.max_output_chars} characters", "too_long")
                parts.append(chunk)
            text = "".join(parts)
            text.encode("utf-8")  # a jinja string literal can spell a lone surrogate; no tokenizer takes one
        except RenderError:
            raise
        except UnicodeEncodeError:
            raise RenderError("the template produced text with a lone UTF-16 surrogate") from None
        except MemoryError:
            raise RenderError("the template needs too much memory") from None
        except RecursionError:
            raise RenderError("the template recurses too deeply") from None
        except TemplateError as error:  # raise_exception(), syntax errors, sandbox refusals: their message says it
            raise RenderError(str(error)) from None
        except Exception as error:  # 1/0, 10.0 ** 400, range(10**6), a missing attribute called, ...
            raise RenderError(f"{type(error).__name__}: {error}") from None
        return text

    def _compile(self, source: str) -> jinja2.Template:
        template = self._compiled.get(source)
        if template is None:
            template = self.environment.from_string(source)
            self._compiled[source] = template
            if len(self._compiled) > _COMPILED_CACHE_SIZE:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(source)
        return template


# ----- the worker process --------------------------------------------------------------------------------------


def _limit_memory() -> None:
    try:
        import resource

        with open("/proc/self/statm") as statm:
            held_bytes = int(statm.read().split()[0]) * resource.getpagesize()
        limit = held_bytes + MEMORY_LIMIT_BYTES
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, OSError, ValueError):  # not Linux: no cap; the wall-clock limit still holds
        pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Timeout()


def serve_one(renderer: TemplateRenderer, line: bytes, timeout_s: float) -> dict[str, Any]:
    """One request line -> the reply object; a render longer than ``timeout_s`` is interrupted."""
    import signal

    try:
        job = json.loads(line)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)  # one-shot: fires at most once per render
        try:
            return {"text": renderer.render(job["template"], job["variables"])}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Timeout:
        return {"error": f"the chat template took longer than {timeout_s:g} s to render", "kind": "timeout"}
    except RenderError as error:
        return {"error": error.message, "kind": error.kind}
    except MemoryError:
        return {"error": "the template needs too much memory", "kind": "invalid"}


def main(argv: list[str]) -> int:
    """``python template_sandbox.py MAX_OUTPUT_CHARS TIMEOUT_S``: serve render requests on stdin/stdout."""
    import signal

    renderer = TemplateRenderer(int(argv[1]))
    timeout_s = float(argv[2])
    _limit_memory()
    signal.signal(signal.SIGALRM, _on_alarm)
    replies = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but replies goes to the pipe
    for line in sys.stdin.buffer:
        reply = serve_one(renderer, line, timeout_s)
        try:
            payload = json.dumps(reply, ensure_ascii=False).encode("utf-8") + b"\n"
        except MemoryError:
            payload = b'{"error": "the template needs too much memory", "kind": "invalid"}\n'
        replies.write(payload)
        replies.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
