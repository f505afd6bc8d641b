"""Wall time of a reram Monte Carlo sweep on 1 worker (in-process) and on N Ray workers, side by side.

The digits CNN, quantized (cleanup + 8-bit dynamic fixed point), is evaluated on the emulator's whole test split
at every point of device-variation seed x ADC resolution (conductance variation 5%; 6 seeds x 4 resolutions = 24
points by default). Every point's BLAS runs on one thread, in both rows, so the rows differ only in how many
points run at once. A control times a plain numpy kernel on N processes without Ray, before and after the
rows: the parallel speedup the machine offers at that moment (on a shared host it can be far below N). Ray is
started once (timed apart) and kept up for every round; with --rounds the rows alternate and the median is
shown. Both rows must give the same points (timings aside), which the script
checks. Asserts nothing about time.

    .venv/bin/python benchmarks/sweep.py [--seeds 6] [--adc-bits 3,4,5,8] [--workers 2] [--samples 450] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimizer.pipeline import optimize  # noqa: E402
from optimizer.sweep import run, without_timings  # noqa: E402
from optimizer.sweep.engine import import_ray, start_ray  # noqa: E402
from samples.digits.digits_cnn import build  # noqa: E402


def _kernel(seed: int) -> float:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((300, 300))
    for _ in range(150):
        a = np.tanh(a @ a.T / 300)
    return float(a[0, 0])


def machine_parallelism(workers: int, tasks: int = 8) -> float:
    """Speedup of a plain numpy kernel on `workers` processes (multiprocessing, no Ray) over one: what the
    machine offers right now, the ceiling the Ray row can be read against on a shared host."""
    from multiprocessing import Pool

    started = time.perf_counter()
    for seed in range(tasks):
        _kernel(seed)
    serial = time.perf_counter() - started
    with Pool(workers) as pool:
        pool.map(_kernel, range(workers))  # start-up and imports out of the timing
        started = time.perf_counter()
        pool.map(_kernel, range(tasks))
        parallel = time.perf_counter() - started
    return serial / parallel


def write_spec(directory: Path, seeds: int, adc_bits: list[int], samples: int) -> Path:
    assets = build(directory)
    calibration = dict(np.load(assets.calibration))
    evaluation = dict(np.load(assets.eval))
    quantized, _ = optimize(onnx.load(str(assets.model)), passes=["cleanup", "quantize"], calibration=calibration)
    onnx.save(quantized, directory / "q.onnx")
    np.savez(directory / "mc_eval.npz", input=evaluation["input"][:samples], labels=evaluation["labels"][:samples])
    spec = {
        "model": "q.onnx",
        "eval": "mc_eval.npz",
        "runtime": "reram",
        "runtime_options": {"adc_bits": "{adc_bits}", "variation": 0.05, "seed": "{seed}"},
        "axes": {"seed": {"range": [0, seeds - 1]}, "adc_bits": adc_bits},
        "objective": "accuracy",
    }
    path = directory / "monte_carlo.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--adc-bits", default="3,4,5,8")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=450, help="test images per point (the split has 450)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds of both rows (median)")
    parser.add_argument("--out", type=Path, default=None, help="where to build the assets (default: temp)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    spec = write_spec(out, args.seeds, [int(b) for b in args.adc_bits.split(",")], args.samples)
    points = args.seeds * len(args.adc_bits.split(","))
    print(f"reram Monte Carlo on the quantized digits CNN: {points} points (seeds 0-{args.seeds - 1} x ADC bits "
          f"{args.adc_bits}), {args.samples} test images each, BLAS threads 1 per point, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start, {args.rounds} round(s), median seconds")

    control = [machine_parallelism(args.workers)]
    ray = import_ray()
    started = time.perf_counter()
    start_ray(ray, args.workers, None)
    ray_start = time.perf_counter() - started
    one_times, many_times = [], []
    for _ in range(args.rounds):  # alternating rows, so that a change in the machine's load hits both
        started = time.perf_counter()
        one = run(spec, workers=1)
        one_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        many = run(spec, workers=args.workers)
        many_times.append(time.perf_counter() - started)
    ray.shutdown()
    control.append(machine_parallelism(args.workers))
    one_seconds, many_seconds = statistics.median(one_times), statistics.median(many_times)

    same = without_timings(one["points"]) == without_timings(many["points"])
    failed = sum(not p["ok"] for p in one["points"]) + sum(not p["ok"] for p in many["points"])
    print(f"{'row':<28}{'points':>7}{'start s':>9}{'sweep s':>9}{'total s':>9}{'speedup':>9}{'incl. start':>13}")
    print(f"{'1 worker (in-process)':<28}{points:>7}{0:>9.1f}{one_seconds:>9.1f}{one_seconds:>9.1f}{1:>8.2f}x"
          f"{1:>12.2f}x")
    total = ray_start + many_seconds
    print(f"{f'{args.workers} workers (local Ray)':<28}{points:>7}{ray_start:>9.1f}{many_seconds:>9.1f}{total:>9.1f}"
          f"{one_seconds / many_seconds:>8.2f}x{one_seconds / total:>12.2f}x")
    print(f"same points on both rows (timings aside): {same}; failed points: {failed}; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"control, a numpy kernel on {args.workers} plain processes (no Ray) against 1: {control[0]:.2f}x before "
          f"the rows, {control[1]:.2f}x after")
    for label, result, wall in (("1 worker", one, one_times[-1]), (f"{args.workers} workers", many, many_times[-1])):
        busy = sum(p["seconds"] for p in result["points"])
        print(f"{label}: mean {busy / points:.2f} s per point, {busy / wall:.2f} points running on average "
              "(last round)")
    accuracy = {}
    for point in one["points"]:
        accuracy.setdefault(point["params"]["adc_bits"], []).append(point["accuracy"])
    print("top-1 over seeds: " + "; ".join(f"{bits}-bit ADC {np.mean(v):.4f} (min {min(v):.4f}, max {max(v):.4f})"
                                           for bits, v in accuracy.items()))


if __name__ == "__main__":
    main()
