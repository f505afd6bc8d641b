"""Compiled modules on disk, keyed by model hash + target + input shapes + the options that change the code.

Location: the `cache_dir` option, else $SCULPT_CACHE_DIR, else ~/.cache/sculpt/tvm. Each entry is a shared
library (the VM executable) and a JSON file with what describe() reports about the build. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import onnx

# Bump when kernels or the pipeline change the generated code, so stale libraries are not reused.
KERNEL_VERSION = "2"


def cache_dir(option: str | None) -> Path:
    if option:
        return Path(option).expanduser()
    env = os.environ.get("SCULPT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sculpt" / "tvm"


def model_hash(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def entry_key(model_digest: str, target_key: str, shapes: dict, settings: dict) -> str:
    import tvm

    text = json.dumps(
        {
            "model": model_digest,
            "target": target_key,
            "shapes": {name: list(shape) for name, shape in sorted(shapes.items())},
            "settings": settings,
            "tvm": tvm.__version__,
            "kernels": KERNEL_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def tuning_dir(option: str | None, model_digest: str, target_key: str, shapes: dict, settings: dict) -> Path:
    """Where `optimize tune` keeps MetaSchedule records for this model, target, input shapes and sparse options."""
    return cache_dir(option) / "tuning" / entry_key(model_digest, target_key, shapes, settings)


def tuning_state(directory: Path) -> str | None:
    """A fingerprint of the tuning records (None when there are none), so compiled modules follow re-tuning."""
    records = sorted(directory.glob("database_tuning_record*.json")) if directory.is_dir() else []
    if not records or all(path.stat().st_size == 0 for path in records):
        return None
    return ";".join(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}" for path in records)


def load(directory: Path, key: str):
    """(executable module, metadata) or None when absent or unreadable."""
    import tvm

    library, meta = directory / f"{key}.so", directory / f"{key}.json"
    if not (library.exists() and meta.exists()):
        return None
    try:
        return tvm.runtime.load_module(str(library)), json.loads(meta.read_text())
    except Exception:  # a truncated or foreign file: rebuild rather than fail
        return None


def store(directory: Path, key: str, executable, metadata: dict) -> str | None:
    """Write the entry; returns None, or why it could not be written (the build still runs from memory)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as scratch:
            library = Path(scratch) / f"{key}.so"
            executable.export_library(str(library))
            meta = Path(scratch) / f"{key}.json"
            meta.write_text(json.dumps(metadata, indent=1))
            os.replace(library, directory / f"{key}.so")
            os.replace(meta, directory / f"{key}.json")
    except Exception as e:  # no C compiler to link the library, read-only home, full disk...
        return f"compiled module not cached: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
    return None
