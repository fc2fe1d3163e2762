"""ServerConfig: the HTTP server's knobs, with their --help text in field metadata (like splitfuse.config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

API_KEY_ENV = "SPLITFUSE_API_KEY"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class ServerConfig:
    host: str = _help("Address to listen on (use 0.0.0.0 to accept connections from other machines).",
                      default="127.0.0.1")
    port: int = _help("TCP port to listen on.", default=8000)
    api_key: Optional[str] = _help(
        f"Require 'Authorization: Bearer <key>' on /v1 routes (default: the {API_KEY_ENV} environment variable; "
        "unset means no key).", default=None)
    served_model_name: Optional[tuple[str, ...]] = _help(
        "Name(s) clients use in the 'model' field; the first is reported in responses "
        "(default: the model as named, or 'smollm2-135m-instruct' for the default model).", default=None)
    log_level: str = _help("Log level of the server and engine.", default="info")
    max_request_body_bytes: int = _help(
        "Larger request bodies get HTTP 413. Parsing a body holds the event loop for a time that grows with "
        "its size, so this bounds how long one request can delay all others.", default=1024 * 1024)
    max_prompts_per_request: int = _help("Most prompts in one /v1/completions request; more get HTTP 400.",
                                         default=128)
    max_choices_per_request: int = _help(
        "Most choices in one request (n x prompts); more get HTTP 400.", default=128)
    trust_request_chat_template: bool = _help(
        "Render chat templates that requests send (chat_template, chat_template_kwargs.chat_template); "
        "without this flag they get HTTP 400. Any template runs sandboxed and time-limited either way.",
        default=False)
    chat_template_timeout_s: float = _help(
        "Longest a chat template may take to render; a slower one gets HTTP 400 (seconds).", default=1.0)
    prompt_workers: int = _help(
        "Threads that render chat templates (each in a sandboxed process) and tokenize prompts, "
        "off the event loop and the engine thread.", default=2)
    shutdown_timeout_s: float = _help(
        "On SIGINT/SIGTERM, how long in-flight requests may run before they are aborted (seconds).",
        default=10.0)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.max_request_body_bytes < 1:
            raise ValueError(f"max_request_body_bytes must be >= 1, got {self.max_request_body_bytes}")
        for name in ("max_prompts_per_request", "max_choices_per_request", "prompt_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.chat_template_timeout_s <= 0:
            raise ValueError(f"chat_template_timeout_s must be > 0, got {self.chat_template_timeout_s}")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}")
        if isinstance(self.served_model_name, str):
            object.__setattr__(self, "served_model_name", (self.served_model_name,))
