"""The benchmark harness behind `optimize bench`: every runtime through the same warm-up / timed-run loop.

Sessions are loaded and warmed up first; the timed runs are then interleaved (one run of each row per round)
so that machine noise hits every row alike and the ratios stay meaningful on a busy host.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import psutil

import runtimes
from optimizer.data import check_feeds, random_inputs, split_labels
from optimizer.errors import UsageError
from optimizer.timing import set_thread_env


@dataclass
class BenchRow:
    model: str
    runtime: str
    session: object
    feeds: dict[str, np.ndarray]
    peak_rss_mb: float = 0.0
    times_ms: list[float] = field(default_factory=list)


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
) -> dict:
    """Time every (model, runtime) pair; returns the `bench` report with one result per pair.

    ratio = this row's median / the first row's median (below 1 is faster).
    """
    if runs < 1 or warmup < 0:
        raise UsageError("--runs must be >= 1 and --warmup >= 0")
    set_thread_env(threads)
    runtime_options = runtime_options or {}
    rows: list[BenchRow] = []
    for label, model in models:
        if inputs is not None:
            feeds = split_labels(inputs)[0]
            check_feeds(feeds, model, "--input")
        else:
            feeds = random_inputs(model, batch, seed)
        for name in runtime_names:
            with _RssSampler() as sampler:
                session = runtimes.load(name, model, threads=threads, **runtime_options.get(name, {}))
                for _ in range(warmup):
                    session.run(feeds)
            rows.append(BenchRow(label, name, session, feeds, sampler.peak / 2**20))
    process = psutil.Process(os.getpid())
    for _ in range(runs):
        for row in rows:
            start = time.perf_counter()
            row.session.run(row.feeds)
            row.times_ms.append((time.perf_counter() - start) * 1e3)
            row.peak_rss_mb = max(row.peak_rss_mb, process.memory_info().rss / 2**20)
    results = []
    first = None
    for row in rows:
        median = float(np.median(row.times_ms))
        first = first if first is not None else median
        result = {
            "model": row.model,
            "runtime": row.runtime,
            "batch": int(next(iter(row.feeds.values())).shape[0]) if row.feeds else batch,
            "threads": threads,
            "median_ms": median,
            "p90_ms": float(np.percentile(row.times_ms, 90)),
            "peak_rss_mb": round(row.peak_rss_mb, 1),
            "ratio": median / first if first > 0 else float("nan"),
        }
        if evaluation is not None and hasattr(row.session, "evaluate"):
            row.session.evaluate(evaluation)
        section = row.session.describe()
        if section:
            result[row.runtime] = section
        results.append(result)
    return {"results": results}
