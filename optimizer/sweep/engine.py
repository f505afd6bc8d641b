"""Where sweep points run: in this process (one worker) or as Ray tasks (a local Ray, or a cluster's).

A *task* is a picklable callable `task(inputs, params) -> dict`; `inputs` (the model and data, the same for
every point) goes to Ray's object store once with `ray.put`, and every task receives it from there. Each point
runs inside `run_point`, which turns any error into `{"ok": False, "error": ...}`, so a failing point is
reported and the others go on. Results come back in the order of the points whatever order they finish in.

Plain Ray tasks, not Ray Tune: a sweep here is an exhaustive grid of independent, deterministic points. Tune
earns its place with search algorithms, early stopping and trial schedulers (ASHA, PBT), none of which a grid
uses, and it would add a trial directory and its own result logging per point and reorder the results; tasks
plus one `ray.put` give the same distribution with the result order and the report format ours.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizer.errors import MissingDependency, SculptError, UsageError

Task = Callable[[Any, dict[str, Any]], dict]
OnResult = Callable[[int, dict, int, int], None]
# wall times (a point's, a pass's, a pass's phases) and measured latencies: the only figures that may differ
# between two runs of the same spec
TIMING_KEYS = ("seconds", "phases", "latency_ms", "p90_ms", "median_ms", "peak_rss_mb", "ratio")


@dataclass
class Outcome:
    """`results[i]` belongs to `points[i]`; None where the point never finished (the sweep was interrupted)."""

    results: list[dict | None]
    interrupted: bool
    workers: int
    backend: str


def run_point(task: Task, inputs: Any, params: dict[str, Any]) -> dict:
    """One point with its errors as data: `{"params", "ok", **task result, "seconds"}` or `{..., "error"}`.

    >>> run_point(lambda inputs, p: {"accuracy": p["x"] / 2}, None, {"x": 1})["accuracy"]
    0.5
    """
    started = time.perf_counter()
    try:
        result = {"params": dict(params), "ok": True, **task(inputs, params)}
    except SculptError as e:
        result = {"params": dict(params), "ok": False, "error": str(e)}
    except Exception as e:  # any failure of one point is that point's result, never the sweep's end
        result = {"params": dict(params), "ok": False, "error": f"{type(e).__name__}: {e}"}
    result["seconds"] = round(time.perf_counter() - started, 4)
    return result


def execute(task: Task, points: list[dict[str, Any]], inputs: Any, *, workers: int = 1, address: str | None = None,
            on_result: OnResult | None = None) -> Outcome:
    """Run every point; `on_result(index, result, finished, total)` follows each one as it finishes.

    workers=1 without an address runs in this process (no Ray). workers>1 starts a local Ray with that many
    CPUs (stopped afterwards); `address` joins a running cluster (`ray start --head`), running up to `workers`
    points at a time when workers>1, else one per CPU of the cluster. Where this process has already called
    `ray.init()`, workers>1 and `address` use that Ray as it is (and leave it running). Ctrl-C cancels what
    is running and returns the finished points with `interrupted=True`.
    """
    if workers < 1:
        raise UsageError(f"--workers {workers}: must be at least 1")
    if workers == 1 and address is None:
        return _execute_here(task, points, inputs, on_result)
    return _execute_ray(task, points, inputs, workers, address, on_result)


def _execute_here(task: Task, points: list[dict], inputs: Any, on_result: OnResult | None) -> Outcome:
    results: list[dict | None] = [None] * len(points)
    try:
        for index, params in enumerate(points):
            results[index] = run_point(task, inputs, params)
            if on_result is not None:
                on_result(index, results[index], index + 1, len(points))
    except KeyboardInterrupt:
        return Outcome(results, True, 1, "in-process")
    return Outcome(results, False, 1, "in-process")


def _execute_ray(task: Task, points: list[dict], inputs: Any, workers: int, address: str | None,
                 on_result: OnResult | None) -> Outcome:
    ray = import_ray(local=address is None)
    owned = not ray.is_initialized()
    if owned:
        start_ray(ray, workers, address)
    results: list[dict | None] = [None] * len(points)
    pending: dict[Any, int] = {}
    limit = workers
    try:
        limit = workers if workers > 1 or address is None else max(1, int(ray.cluster_resources().get("CPU", 1)))
        remote = ray.remote(num_cpus=1, max_retries=0)(run_point)
        task_ref, inputs_ref = ray.put(task), ray.put(inputs)  # once, not per point
        submitted = finished = 0
        while finished < len(points):
            while submitted < len(points) and len(pending) < limit:
                pending[remote.remote(task_ref, inputs_ref, points[submitted])] = submitted
                submitted += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                results[index] = _fetch(ray, ref, points[index])
                finished += 1
                if on_result is not None:
                    on_result(index, results[index], finished, len(points))
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        return Outcome(results, True, limit, _backend(address))
    finally:
        if owned:
            ray.shutdown()
    return Outcome(results, False, limit, _backend(address))


def _fetch(ray, ref, params: dict) -> dict:
    """The point's result; a worker that died (killed, out of memory) fails its point alone."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return {"params": dict(params), "ok": False, "error": f"ray: {type(e).__name__}: {first}"}


def start_ray(ray, workers: int, address: str | None) -> None:
    """Join the cluster at `address`, or start a local Ray with `workers` CPUs whose workers import this code."""
    quiet = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address is not None:
        _check_reachable(address)
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UsageError(f"--address {address}: cannot join the Ray cluster ({str(e).splitlines()[0]})") from None
        return
    # workers import the code this process runs (not whatever `sculpt` the environment has installed)
    root = str(Path(__file__).resolve().parents[2])
    python_path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    # Ray runs its workers at nice 15 by default; a sweep's points run at the priority of the command that
    # started them, as they do with --workers 1 (on a shared machine nice 15 hands the CPUs to everyone else)
    ray.init(address="local", num_cpus=workers, runtime_env={"env_vars": {"PYTHONPATH": python_path}},
             _system_config={"worker_niceness": 0}, **quiet)


def _check_reachable(address: str) -> None:
    """Fail fast when nothing listens at a plain `host:port` (Ray itself retries for minutes)."""
    import socket

    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # "auto", ray:// client addresses: Ray resolves these itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise UsageError(f"--address {address}: cannot join the Ray cluster (nothing answers there: "
                         f"{e.strerror or e}); start one with `ray start --head --port={port}`") from None


def import_ray(local: bool = True):
    """Ray, imported on first use. Imported for a local Ray (no --address) it stays on the loopback interface:
    Ray otherwise binds its services to the host's routable address, which a one-machine sweep has no use for
    (the switch is read once, when Ray is first imported)."""
    if local and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's switch for loopback-only nodes
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise MissingDependency("ray", "dist") from None
    return ray


def _backend(address: str | None) -> str:
    return f"ray cluster {address}" if address else "local ray"
