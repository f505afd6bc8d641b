"""Timing that stays meaningful on a busy host: fixed thread counts and interleaved bursts.

    before_ms, after_ms = interleaved_ms([lambda: a.run(feeds), lambda: b.run(feeds)], seconds=1.0)
    speedup = before_ms / after_ms
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS")


def set_thread_env(threads: int) -> None:
    """Fix the thread count of every library a runtime may use, before any of them starts its pool."""
    for var in THREAD_VARIABLES:
        os.environ[var] = str(threads)


def interleaved_ms(functions: Sequence[Callable[[], object]], seconds: float, burst_s: float = 0.05) -> list[float]:
    """Per function: the fastest single call (ms), the functions taking turns in bursts until `seconds` have passed.

    On a shared host the minimum is the estimate least disturbed by other processes; taking turns exposes every
    function to the same load. Bursts (and dropping each burst's first call) keep one runtime's thread pool,
    still spinning after its last call, from slowing the other's first call.
    """
    best = [float("inf")] * len(functions)
    deadline = time.perf_counter() + seconds
    rounds = 0
    while time.perf_counter() < deadline or rounds < 3:
        for i, function in enumerate(functions):
            burst_end = time.perf_counter() + burst_s
            calls = 0
            while calls < 2 or time.perf_counter() < burst_end:
                start = time.perf_counter()
                function()
                if calls:
                    best[i] = min(best[i], time.perf_counter() - start)
                calls += 1
        rounds += 1
    return [b * 1e3 for b in best]
