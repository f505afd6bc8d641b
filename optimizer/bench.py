"""The benchmark harness behind `optimize bench`: every runtime through the same warm-up / timed-run loop.

Sessions are loaded and warmed up first; the timed runs are then interleaved (one run of each row per round)
so that machine noise hits every row alike and the ratios stay meaningful on a busy host.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import psutil

import runtimes
from optimizer.data import check_feeds, random_inputs, split_labels
from optimizer.errors import SculptError, UsageError
from optimizer.timing import set_thread_env

MEMORY_METHOD = "RSS growth while the row loads and warms up (a per-row delta within one process)"


@dataclass
class BenchRow:
    model: str
    runtime: str
    session: object
    feeds: dict[str, np.ndarray]
    rss_delta_mb: float = 0.0
    times_ms: list[float] = field(default_factory=list)
    failure: SculptError | None = None

    @property
    def error(self) -> str | None:
        return None if self.failure is None else str(self.failure)


class _RssSampler:
    """Highest resident set size seen while the block runs (sampled every 2 ms; used around load and warm-up,
    not around timed runs, where a sampling thread would disturb the timing)."""

    def __init__(self):
        self._process = psutil.Process(os.getpid())
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def bench(
    models: list[tuple[str, onnx.ModelProto]],
    runtime_names: list[str],
    inputs: dict[str, np.ndarray] | None = None,
    batch: int = 1,
    threads: int = 1,
    runs: int = 20,
    warmup: int = 3,
    seed: int = 0,
    runtime_options: dict[str, dict] | None = None,
    evaluation: dict[str, np.ndarray] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Time every (model, runtime) pair; returns the `bench` report with one result per pair.

    ratio = this row's median / the first working row's median (below 1 is faster). A row whose runtime fails
    to load or run keeps its place with an "error" entry and the other rows are still timed; when every row
    fails, the first failure is raised. `progress` hears about each load (TVM compiles for seconds).
    """
    if runs < 1 or warmup < 0:
        raise UsageError("--runs must be >= 1 and --warmup >= 0")
    unknown = [name for name in runtime_names if name not in runtimes.RUNTIMES]
    if unknown:
        raise UsageError(f"unknown runtime {unknown[0]!r}; available runtimes: {', '.join(runtimes.RUNTIMES)}")
    set_thread_env(threads)
    runtime_options = runtime_options or {}
    rows: list[BenchRow] = []
    first_error: SculptError | None = None
    for label, model in models:
        if inputs is not None:
            feeds = split_labels(inputs)[0]
            check_feeds(feeds, model, "--input")
        else:
            feeds = random_inputs(model, batch, seed)
        for name in runtime_names:
            row = _load_row(label, model, name, feeds, threads, warmup, runtime_options.get(name, {}), progress)
            if row.error is not None and first_error is None:
                first_error = row.failure
            rows.append(row)
    working = [row for row in rows if row.error is None]
    if not working:
        raise first_error
    _timed_rounds(working, runs)
    return {"results": [_result(row, working[0], threads, batch, evaluation) for row in rows],
            "memory": MEMORY_METHOD}


def _load_row(label: str, model: onnx.ModelProto, name: str, feeds: dict, threads: int, warmup: int,
              options: dict, progress: Callable[[str], None] | None) -> BenchRow:
    """Load and warm up one row's session, measuring its RSS growth; a SculptError becomes the row's error."""
    if progress is not None:
        progress(f"loading {label} on {name}" + (" (compiling)…" if name == "tvm" else "…"))
    started = time.perf_counter()
    before = psutil.Process(os.getpid()).memory_info().rss
    try:
        with _RssSampler() as sampler:
            session = runtimes.load(name, model, threads=threads, **options)
            for _ in range(warmup):
                session.run(feeds)
    except SculptError as e:
        if progress is not None:
            progress(f"{label} on {name} failed: {e}")
        return BenchRow(label, name, None, feeds, failure=e)
    if progress is not None:
        progress(f"{label} on {name} ready in {time.perf_counter() - started:.1f} s")
    return BenchRow(label, name, session, feeds, max(0.0, (sampler.peak - before) / 2**20))


def _timed_rounds(rows: list[BenchRow], runs: int) -> None:
    """Interleaved timed runs; a row that fails mid-way keeps its error and leaves the rounds."""
    for _ in range(runs):
        for row in rows:
            if row.error is not None:
                continue
            start = time.perf_counter()
            try:
                row.session.run(row.feeds)
            except SculptError as e:
                row.failure = e
                continue
            row.times_ms.append((time.perf_counter() - start) * 1e3)


def _result(row: BenchRow, first: BenchRow, threads: int, batch: int, evaluation: dict | None) -> dict:
    result = {"model": row.model, "runtime": row.runtime, "threads": threads}
    if row.error is not None:
        return {**result, "error": row.error}
    median = float(np.median(row.times_ms))
    first_median = float(np.median(first.times_ms)) if first.times_ms else float("nan")
    result.update({
        "batch": int(next(iter(row.feeds.values())).shape[0]) if row.feeds else batch,
        "median_ms": median,
        "p90_ms": float(np.percentile(row.times_ms, 90)),
        "rss_delta_mb": round(row.rss_delta_mb, 1),
        "ratio": median / first_median if first_median > 0 else float("nan"),
    })
    if evaluation is not None and hasattr(row.session, "evaluate"):
        try:
            row.session.evaluate(evaluation)
        except SculptError as e:
            result["evaluate_error"] = str(e)
    section = row.session.describe()
    if section:
        result[row.runtime] = section
    return result
