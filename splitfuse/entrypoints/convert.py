"""The `splitfuse convert` subcommand: a GGUF file -> a Hugging Face checkpoint directory any engine loads."""

from __future__ import annotations

import argparse
import sys
from typing import Any

_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def add_convert_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert", help="Write a GGUF file as a Hugging Face checkpoint directory.",
        description="Dequantize a GGUF file into a Hugging Face checkpoint directory (config.json, "
                    "safetensors, tokenizer files with the chat template) that transformers and vLLM load "
                    "as it is, so every engine can run the very same weights.")
    parser.add_argument("gguf", metavar="GGUF", help="The .gguf file.")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="Directory to create (must not exist or be empty).")
    parser.add_argument("--dtype", choices=_DTYPE_NAMES, default="float32",
                        help="Weight dtype of the checkpoint (default: float32, which holds every GGUF "
                             "type's values exactly).")
    parser.set_defaults(func=run_convert)
    return parser


def run_convert(args: argparse.Namespace) -> int:
    import torch

    from splitfuse.models.gguf import convert_gguf

    try:
        path = convert_gguf(args.gguf, args.out_dir, getattr(torch, args.dtype))
    except (ValueError, OSError) as error:
        print(f"splitfuse convert: error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0
