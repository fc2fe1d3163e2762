"""Every failure as OpenAI's error shape {"error": {"message", "type", "param", "code"}}, with the right status.

Statuses: 400 bad parameters / malformed JSON / over the context window / unknown model,
401 bad API key, 404/405 unknown route, 413 oversized body, 429 waiting queue full (with
Retry-After), 503 shutting down or engine down; 500 is left only for bugs. Error bodies are
ASCII JSON, so they encode whatever the message quotes (a lone surrogate becomes "\\ud800").
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from splitfuse.engine.async_engine import EngineDeadError, EngineStepError, EngineStoppedError, QueueFullError
from splitfuse.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable_error",
    504: "server_error",
}
# Seconds a client should wait after a 429: the queue drains at the engine's pace, a step or a few.
RETRY_AFTER_S = 1


class OpenAIError(Exception):
    """An error the API reports to the client; raise it anywhere in a route."""

    def __init__(self, message: str, status: int = 400, *, param: Optional[str] = None,
                 code: Optional[str] = None, type: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error")
        self.headers = headers

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))


def error_body(message: str, status: int, **kwargs: Any) -> dict[str, Any]:
    """The JSON body of an error, for places without an exception (ASGI middleware, SSE streams)."""
    return OpenAIError(message, status, **kwargs).to_response().model_dump()


class _ASCIIJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def json_error(error: OpenAIError) -> JSONResponse:
    return _ASCIIJSONResponse(error.to_response().model_dump(), status_code=error.status, headers=error.headers)


def from_engine_error(error: BaseException, param_names: frozenset[str] = frozenset()) -> OpenAIError:
    """Map what the (async) engine raises to an API error.

    ``ValueError`` messages name the offending field first ("max_tokens must be ..."),
    so the first word becomes ``param`` when it is a request field.
    """
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, QueueFullError):
        return OpenAIError(str(error), 429, code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(error, (EngineStoppedError, EngineDeadError)):
        return OpenAIError(str(error), 503, code="engine_unavailable")
    if isinstance(error, EngineStepError):
        return OpenAIError(str(error), 500, code="engine_error")
    if isinstance(error, ValueError):
        message = str(error)
        first_word = message.split(" ", 1)[0].strip(":,'\"")
        return OpenAIError(message, 400, param=first_word if first_word in param_names else None)
    logger.exception("unexpected error", exc_info=error)
    return OpenAIError(f"internal error: {error!r}", 500, code="internal_error")


_SCALAR_TYPES = frozenset({"str", "int", "float", "bool"})  # union alternatives that look like names


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    """A readable message and ``param`` from pydantic's errors.

    pydantic reports a union field once per alternative, with the alternative in the path
    (``prompt.list[int].0``); those collapse into one line: "prompt: expected str or list[int] or ...".
    """
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"malformed JSON body: {detail}".rstrip(": "), None
    paths, alternatives = [], []
    for error in errors:
        path: list[str] = []
        for part in error.get("loc", ())[1:] if error.get("loc", ("",))[0] == "body" else error.get("loc", ()):
            if isinstance(part, str) and (part in _SCALAR_TYPES or not part.isidentifier()):  # "str", "list[int]"
                alternatives.append(part)
                break
            path.append(str(part))
        paths.append(path)
    common = paths[0]
    for path in paths[1:]:
        common = [a for a, b in zip(common, path) if a == b][:len(common)]
    param = ".".join(common) or None
    if alternatives and len(errors) > 1:
        expected = " or ".join(dict.fromkeys(alternatives))
        return f"{param}: invalid value; expected {expected}", param
    message = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return f"{param or 'request body'}: {message}{more}", param


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception through the OpenAI error shape."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return json_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return json_error(OpenAIError(message, 400, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
        return json_error(OpenAIError(message, status))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return json_error(from_engine_error(exc))
