"""The `tvm` runtime's options, parsed from CLI strings (`--tvm sparse=always,threads=1`) or typed values."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from optimizer.errors import UsageError
from optimizer.options import parse_options as parse_typed_options
from runtimes.tvm.kernels.bsr import BlockShape

SPARSE_MODES = ("auto", "always", "never")


def parse_block(value) -> BlockShape:
    """`16x1` (rows x cols) or a BlockShape -> BlockShape."""
    if isinstance(value, BlockShape):
        return value
    try:
        block = BlockShape.parse(str(value))
    except ValueError:
        raise UsageError(f"runtime tvm: option block={value!r} is not RxC, e.g. 16x1 or 8x8") from None
    if block.rows < 1 or block.cols < 1:
        raise UsageError(f"runtime tvm: option block={value!r} needs positive sizes, e.g. 16x1")
    return block


@dataclass(frozen=True)
class TvmOptions:
    threads: int | None = None  # worker threads; default TVM_NUM_THREADS, else all cores
    batch: int | None = None  # compile for this batch at load; default: the model's, else the feeds' batch
    sparse: Literal["auto", "always", "never"] = "auto"  # auto: BSR per layer where its block sparsity pays
    # force one BSR block shape (e.g. 16x1) instead of picking per layer
    block: BlockShape | None = field(default=None, metadata={"parse": parse_block})
    cache: bool = True  # keep compiled modules on disk
    cache_dir: str | None = None  # default $SCULPT_CACHE_DIR, else ~/.cache/sculpt/tvm
    tuned: bool = True  # apply MetaSchedule records from `optimize tune` when the cache holds them

    def __post_init__(self):
        for name in ("threads", "batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"runtime tvm: option {name}={value!r} must be at least 1")

    def code_settings(self) -> dict:
        """The options that change the generated code (part of every cache key)."""
        return {"sparse": self.sparse, "block": str(self.block) if self.block else None}


def option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TvmOptions)]


def parse_options(values: dict) -> TvmOptions:
    """TvmOptions from CLI strings or typed values; a None value keeps the default."""
    given = {key: value for key, value in values.items() if value is not None}
    return parse_typed_options(TvmOptions, given, where="runtime tvm")
