"""Atomic file writes for reports and arrays (JSON, .npz): never a half-written file at the target path."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from optimizer.errors import UsageError


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UsageError(f"{path}: directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a report or output is an ordinary file
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def to_json(payload) -> str:
    return json.dumps(payload, indent=2, default=_plain, allow_nan=True)


def write_json(path: str | os.PathLike, payload) -> None:
    text = to_json(payload)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text + "\n")


def write_bytes(path: str | os.PathLike, content: bytes) -> None:
    """Write `content` to `path` atomically (the file appears whole or not at all)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(content)


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """np.savez to `path`, atomically (the file appears whole or not at all)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
