"""The `tvm` runtime's options, parsed from CLI strings (`--tvm sparse=always,threads=1`) or typed values."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from optimizer.errors import UsageError
from runtimes.tvm.kernels.bsr import BlockShape

SPARSE_MODES = ("auto", "always", "never")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class TvmOptions:
    threads: int | None = None  # worker threads; default TVM_NUM_THREADS, else all cores
    batch: int | None = None  # compile for this batch at load; default: the model's, else the feeds' batch
    sparse: str = "auto"  # auto: BSR per layer where its block sparsity pays; always; never
    block: BlockShape | None = None  # force one BSR block shape (e.g. 16x1) instead of picking per layer
    cache: bool = True  # keep compiled modules on disk
    cache_dir: str | None = None  # default $SCULPT_CACHE_DIR, else ~/.cache/sculpt/tvm
    tuned: bool = True  # apply MetaSchedule records from `optimize tune` when the cache holds them

    def code_settings(self) -> dict:
        """The options that change the generated code (part of every cache key)."""
        return {"sparse": self.sparse, "block": str(self.block) if self.block else None}


def option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TvmOptions)]


def parse_options(values: dict) -> TvmOptions:
    unknown = [key for key in values if key.replace("-", "_") not in option_names()]
    if unknown:
        raise UsageError(f"runtime tvm: unknown option {unknown[0]!r}; options are: {', '.join(option_names())}")
    typed = {key.replace("-", "_"): value for key, value in values.items() if value is not None}  # None: default
    return TvmOptions(**{name: _coerce(name, value) for name, value in typed.items()})


def _coerce(name: str, value):
    if name in ("threads", "batch"):
        number = _integer(name, value)
        if number < 1:
            raise UsageError(f"runtime tvm: option {name}={value!r} must be at least 1")
        return number
    if name == "sparse":
        if str(value) not in SPARSE_MODES:
            raise UsageError(f"runtime tvm: option sparse={value!r} is not one of {', '.join(SPARSE_MODES)}")
        return str(value)
    if name == "block":
        return _block(value)
    if name in ("cache", "tuned"):
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text not in _TRUE | _FALSE:
            raise UsageError(f"runtime tvm: option {name}={value!r} is not a boolean (true/false)")
        return text in _TRUE
    return str(value)


def _integer(name: str, value) -> int:
    try:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise UsageError(f"runtime tvm: option {name}={value!r} is not an integer") from None


def _block(value) -> BlockShape:
    if isinstance(value, BlockShape):
        return value
    try:
        block = BlockShape.parse(str(value))
    except ValueError:
        raise UsageError(f"runtime tvm: option block={value!r} is not RxC, e.g. 16x1 or 8x8") from None
    if block.rows < 1 or block.cols < 1:
        raise UsageError(f"runtime tvm: option block={value!r} needs positive sizes, e.g. 16x1")
    return block
