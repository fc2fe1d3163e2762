"""Checkpoint directories written whole or not at all, and built once by whichever writer finishes first.

A reader of a cache (the demo checkpoint, a converted GGUF file) must never see half a checkpoint, and
two processes may build the same one at once: each writes into a temp dir beside the target and renames
it into place, so the first rename wins and the loser's copy is dropped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Callable, Iterator


def is_complete(path: str) -> bool:
    """A whole checkpoint is there: directories are renamed into place finished, so config.json suffices."""
    return os.path.isfile(os.path.join(path, "config.json"))


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yields an empty temp dir beside `path`; when the block ends without error, it becomes `path`.

    `path` must not exist or be an empty directory (FileExistsError before anything is written). If
    another writer finished `path` first, FileExistsError and their directory is kept. The temp dir is
    always removed; what lands at `path` is readable by all (0755 / 0644)."""
    path = os.path.abspath(path)
    if os.path.isdir(path) and os.listdir(path):
        raise FileExistsError(f"{path} already exists and is not empty")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    temp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield temp_dir
        # mkdtemp makes the dir 0700 and safetensors writes 0600; a shared cache must stay readable.
        os.chmod(temp_dir, 0o755)
        for file_name in os.listdir(temp_dir):
            os.chmod(os.path.join(temp_dir, file_name), 0o644)
        try:
            os.rename(temp_dir, path)
        except OSError as error:  # a non-empty dir is there now: someone else won the race
            raise FileExistsError(f"{path} was written concurrently") from error
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)  # no-op after a successful rename


def build_once(path: str, build: Callable[[], object]) -> bool:
    """Runs `build` (which writes `path` through atomic_directory) unless a whole checkpoint is there.

    True if this call built it. A concurrent writer that finished first is fine (its checkpoint is
    used); a `path` holding something else re-raises the FileExistsError."""
    if is_complete(path):
        return False
    try:
        build()
    except FileExistsError:
        if not is_complete(path):
            raise
        return False
    return True
