"""The `splitfuse serve` and `splitfuse generate` subcommands; their flags are generated from the config dataclasses.

Every engine flag is a field of ModelConfig / CacheConfig / SchedulerConfig and every
server flag a field of ServerConfig, with the field's ``metadata["help"]`` as its help,
so a knob is described in one place. Unset flags stay None and the dataclass default applies.
The sampling flags that `generate` and `chat` share are defined once here (add_sampling_flags).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from typing import Any, Callable, Optional

from splitfuse.config import (ATTENTION_BACKENDS, ROUTING_POLICIES, CacheConfig, EngineConfig, ModelConfig,
                              ParallelConfig, SchedulerConfig, config_fields, parse_memory_size)
from splitfuse.entrypoints.openai.server_config import API_KEY_ENV, LOG_LEVELS, ServerConfig

ENGINE_CONFIGS = (ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig)

# Fields whose flag parses differently from their annotation.
_FLAG_TYPES: dict[str, Callable[[str], Any]] = {"kv_cache_memory": parse_memory_size}
_FLAG_CHOICES: dict[str, tuple[str, ...]] = {"log_level": LOG_LEVELS, "attention_backend": ATTENTION_BACKENDS,
                                              "routing": ROUTING_POLICIES, "speculative_method": ("ngram", "draft")}


def _flag_kind(hint: Any) -> Any:
    """What a field annotation asks of argparse: Optional[int] -> int; bool -> "bool"; tuple[str, ...] -> "list"."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint
    if base is bool:
        return "bool"
    if typing.get_origin(base) is tuple:
        return "list"
    return base if base in (int, float, str) else str


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type, *, skip: tuple[str, ...] = (),
                     group_title: Optional[str] = None) -> None:
    """One ``--field-name`` flag per dataclass field (default None = "use the dataclass default")."""
    group = parser.add_argument_group(group_title or config_cls.__name__)
    hints = typing.get_type_hints(config_cls)
    for field in config_fields(config_cls):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        if field.default not in (None, "", dataclasses.MISSING) and "default" not in help_text.lower():
            help_text += f" (default: {field.default})"
        kind = _flag_kind(hints[field.name])
        if kind == "bool":
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        elif kind == "list":
            group.add_argument(flag, dest=field.name, nargs="+", default=None, help=help_text)
        else:
            group.add_argument(flag, dest=field.name, type=_FLAG_TYPES.get(field.name, kind), default=None,
                               choices=_FLAG_CHOICES.get(field.name), help=help_text)


def config_kwargs(args: argparse.Namespace, config_classes: tuple[type, ...],
                  skip: tuple[str, ...] = ("model",)) -> dict[str, Any]:
    """The flags the user set, for ``EngineConfig.from_kwargs`` / ``ServerConfig(**...)``.

    ``model`` is skipped: it is resolved separately (positional or --model, the default model otherwise).
    """
    names = {field.name for cls in config_classes for field in config_fields(cls)} - set(skip)
    return {name: value for name, value in vars(args).items() if name in names and value is not None}


def model_help() -> str:
    return next(f for f in config_fields(ModelConfig) if f.name == "model").metadata["help"]


def _resolve_model(model: Optional[str]) -> tuple[str, str]:
    """(model name for the engine, default served name); no MODEL means the default model.

    The engine resolves the name (splitfuse.models.sources): a GGUF file is converted there, once."""
    from splitfuse.models.sources import DEFAULT_MODEL_NAME

    return (model, model) if model else (DEFAULT_MODEL_NAME, DEFAULT_MODEL_NAME)


def _engine_config(args: argparse.Namespace, model_path: str) -> EngineConfig:
    kwargs = config_kwargs(args, ENGINE_CONFIGS)
    kwargs["model"] = model_path
    return EngineConfig.from_kwargs(**kwargs)


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Every engine knob but ``model`` (taken as a positional or --model by each command)."""
    for config_cls in ENGINE_CONFIGS:
        add_config_flags(parser, config_cls, skip=("model",), group_title=config_cls.__name__)


# The SamplingParams fields that add_sampling_flags sets (``n`` only where a command adds it). A sampled
# run is made reproducible by the engine's --seed (ModelConfig.seed), so there is no second seed flag.
_SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "stop", "ignore_eos", "n")


def add_sampling_flags(parser: argparse.ArgumentParser, *, max_tokens_default: int) -> Any:
    """The sampling flags of `generate` and `chat`; unset ones keep the SamplingParams default."""
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=int, default=max_tokens_default,
                          help=f"Most tokens to generate (default: {max_tokens_default}).")
    sampling.add_argument("--temperature", type=float, default=None,
                          help="Sampling temperature; 0 is greedy (default: 1.0).")
    sampling.add_argument("--top-p", type=float, default=None, help="Nucleus sampling mass (default: 1.0).")
    sampling.add_argument("--top-k", type=int, default=None, help="Sample among the k most likely (default: all).")
    sampling.add_argument("--stop", action="append", default=None, help="Stop string (repeatable).")
    sampling.add_argument("--ignore-eos", action="store_true", default=None, help="Keep going past EOS.")
    return sampling


def sampling_params_from_args(args: argparse.Namespace) -> Any:
    """SamplingParams from the flags the user set; ValueError naming the field if one is invalid."""
    from splitfuse.sampling_params import SamplingParams

    return SamplingParams(**{name: getattr(args, name) for name in _SAMPLING_FLAGS
                             if getattr(args, name, None) is not None})


def _configure_logging(level: str) -> None:
    python_level = logging.DEBUG if level == "trace" else getattr(logging, level.upper())
    logging.basicConfig(level=python_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ----- serve -----------------------------------------------------------------------------------


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``splitfuse serve [MODEL] [flags]``."""
    parser = subparsers.add_parser("serve", help="Run the OpenAI-compatible HTTP server.",
                                   description="Serve a model over an OpenAI-compatible HTTP API "
                                               "(/v1/completions, /v1/chat/completions, /metrics, ...).")
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL", help=model_help())
    # `--model M` as well, the spelling of `generate`, `chat` and vLLM's api_server.
    parser.add_argument("--model", dest="model_flag", default=None, metavar="MODEL", help="The same as MODEL.")
    add_config_flags(parser, ServerConfig, group_title="server")
    add_engine_flags(parser)
    parser.set_defaults(func=run_serve)
    return parser


def serve_configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig, list[str]]:
    """(engine config, server config, served model names) from parsed ``serve`` flags; ValueError if invalid."""
    server_kwargs = config_kwargs(args, (ServerConfig,))
    server_kwargs.setdefault("api_key", os.environ.get(API_KEY_ENV) or None)
    server_config = ServerConfig(**server_kwargs)
    if args.model and args.model_flag and args.model != args.model_flag:
        raise ValueError(f"two models given: {args.model!r} and --model {args.model_flag!r}")
    model_path, default_name = _resolve_model(args.model or args.model_flag)
    engine_config = _engine_config(args, model_path)
    return engine_config, server_config, list(server_config.served_model_name or (default_name,))


def run_serve(args: argparse.Namespace) -> int:
    from splitfuse.engine.async_engine import AsyncLLMEngine
    from splitfuse.entrypoints.openai.server import run_server

    try:
        engine_config, server_config, served_names = serve_configs(args)
    except (ValueError, TypeError) as error:
        print(f"splitfuse serve: error: {error}", file=sys.stderr)
        return 2
    _configure_logging(server_config.log_level)
    try:
        engine = AsyncLLMEngine.from_config(engine_config)  # load the model before taking the port
    except (ValueError, OSError) as error:
        print(f"splitfuse serve: cannot load the model: {error}", file=sys.stderr)
        return 1
    return run_server(engine, served_names, server_config)


# ----- generate ----------------------------------------------------------------------------------


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``splitfuse generate PROMPT [--raw] [--model M] [--max-tokens N] ...`` (offline, no server)."""
    parser = subparsers.add_parser(
        "generate", help="Answer one prompt (or complete it with --raw) and print the text.",
        description="Run the offline engine on one prompt and print the result. The prompt is sent as a "
                    "user message through the model's chat template when its tokenizer has one (as "
                    "`ollama run` does); --raw, or a model without a template, completes the text as it is.")
    parser.add_argument("prompt", help="The prompt text.")
    parser.add_argument("--model", default=None, help=model_help())
    parser.add_argument("--raw", action="store_true",
                        help="Complete the prompt text as it is, without the chat template.")
    sampling = add_sampling_flags(parser, max_tokens_default=64)
    sampling.add_argument("-n", "--n", type=int, default=None, help="Completions to generate (default: 1).")
    add_engine_flags(parser)
    parser.set_defaults(func=run_generate)
    return parser


class CommandError(Exception):
    """A command's one-line message for stderr and its exit status: 2 for bad flags, 1 for an unusable model."""

    def __init__(self, command: str, message: str, exit_code: int) -> None:
        super().__init__(f"splitfuse {command}: {message}")
        self.exit_code = exit_code

    def report(self) -> int:
        print(self, file=sys.stderr)
        return self.exit_code


def load_offline(args: argparse.Namespace, command: str) -> tuple[Any, Any]:
    """(LLM, SamplingParams) from `generate` / `chat` flags; every flag is checked before the model loads."""
    from splitfuse.entrypoints.llm import LLM

    try:
        model_path, _ = _resolve_model(args.model)
        engine_kwargs = config_kwargs(args, ENGINE_CONFIGS)
        EngineConfig.from_kwargs(model=model_path, **engine_kwargs)
        params = sampling_params_from_args(args)
    except (ValueError, TypeError) as error:
        raise CommandError(command, f"error: {error}", 2) from None
    try:
        return LLM(model=model_path, **engine_kwargs), params
    except (ValueError, OSError) as error:
        raise CommandError(command, f"cannot load the model: {error}", 1) from None


def run_generate(args: argparse.Namespace) -> int:
    try:
        llm, params = load_offline(args, "generate")
    except CommandError as error:
        return error.report()
    try:
        if args.raw or not llm.has_chat_template:
            (output,) = llm.generate([args.prompt], params, use_tqdm=False)
        else:
            (output,) = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    except ValueError as error:  # e.g. the prompt does not fit the context window
        print(f"splitfuse generate: error: {error}", file=sys.stderr)
        return 2
    for completion in output.outputs:
        if len(output.outputs) > 1:
            print(f"--- completion {completion.index} ({completion.finish_reason})")
        print(completion.text)
    return 0
