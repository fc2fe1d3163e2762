"""The `splitfuse` command: serve, generate, chat, convert, bench, router."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from splitfuse.bench.cli import add_bench_parser
    from splitfuse.entrypoints.chat import add_chat_parser
    from splitfuse.entrypoints.convert import add_convert_parser
    from splitfuse.entrypoints.openai.cli_args import add_generate_parser, add_serve_parser
    from splitfuse.entrypoints.router_cli import add_router_parser

    parser = argparse.ArgumentParser(prog="splitfuse", description="LLM serving engine.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(subparsers)
    add_generate_parser(subparsers)
    add_chat_parser(subparsers)
    add_convert_parser(subparsers)
    add_bench_parser(subparsers)
    add_router_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
