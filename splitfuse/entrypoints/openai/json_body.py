"""Request bodies parsed by pydantic's JSON parser (jiter) before FastAPI validates them.

Python's json module accepts two things the rest of the server cannot take: lone UTF-16
surrogates (``"\\ud800"`` is legal JSON, but such a str has no UTF-8 form, so tokenizers and
response encoders fail on it) and nesting deep enough for a RecursionError later on. jiter
refuses both, and is faster; this route class hands FastAPI its result, and a refusal is a 400
naming the reason.
"""

from __future__ import annotations

from typing import Any, Callable, Coroutine

import pydantic_core
from fastapi import Request, Response
from fastapi.routing import APIRoute

from splitfuse.entrypoints.openai.errors import OpenAIError

# jiter's recursion limit: arrays and objects nest at most this deep below the top-level value.
MAX_JSON_DEPTH = 200
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


def parse_json_body(body: bytes) -> Any:
    """The JSON value of ``body``; an OpenAIError (400) for malformed JSON, lone surrogates or deep nesting."""
    try:
        return pydantic_core.from_json(body)
    except ValueError as error:
        message = str(error)
    if message.startswith("recursion limit exceeded"):
        raise OpenAIError(f"the JSON body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep",
                          code="json_too_deep")
    # jiter: "lone leading surrogate in hex escape", or "unexpected end of hex escape" when no low half follows.
    if "surrogate" in message or "end of hex escape" in message:
        raise OpenAIError('the JSON body holds a lone UTF-16 surrogate (such as "\\ud800"); strings must be '
                          "valid Unicode", code="invalid_unicode")
    raise OpenAIError(f"malformed JSON body: {message}", code="invalid_json")


class _JSONRequest(Request):
    """A request whose ``json()`` is ``parse_json_body`` of its body (FastAPI calls ``json()`` to read bodies)."""

    async def json(self) -> Any:
        if not hasattr(self, "_parsed_json"):
            self._parsed_json = parse_json_body(await self.body())
        return self._parsed_json


class JSONBodyRoute(APIRoute):
    """Routes whose JSON bodies go through ``parse_json_body``; set as ``app.router.route_class``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parse_then_handle(request: Request) -> Response:
            request = _JSONRequest(request.scope, request.receive)
            # Parsed here, outside FastAPI's own try block (which would turn any error into a vague
            # "error parsing the body"), so the OpenAIError reaches the error handlers as it is.
            # An empty body is left to FastAPI ("body: Field required").
            if request.method not in _NO_BODY_METHODS and await request.body():
                await request.json()
            return await handler(request)

        return parse_then_handle
