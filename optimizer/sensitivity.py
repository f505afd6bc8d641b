"""Pruning sensitivity: prune one channel group at a time, at several ratios, and measure the damage.

The metric is top-1 accuracy when the evaluation data has labels, else the cosine similarity of the outputs
to the unpruned model's. Groups come out sorted by their worst drop, so fragile layers head the list and can
be passed to `structured-sparse:exclude=...`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from optimizer.data import split_labels
from optimizer.errors import PassError, UsageError
from optimizer.verify import compare, run_ort, top1

DEFAULT_RATIOS = (0.25, 0.5, 0.75)


def parse_ratios(text: str) -> tuple[float, ...]:
    """'0.25,0.5' -> (0.25, 0.5); each ratio must be in (0, 1)."""
    try:
        ratios = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--ratios {text!r}: expected comma-separated numbers such as 0.25,0.5,0.75") from None
    if not ratios or not all(0 < r < 1 for r in ratios):
        raise UsageError(f"--ratios {text!r}: every ratio must be between 0 and 1 (exclusive)")
    return ratios


def _metric(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], labels: np.ndarray | None) -> float:
    if labels is None:
        return compare(reference, outputs)["cosine"]
    return top1(next(iter(outputs.values())), labels)


@dataclass(frozen=True)
class _TrialInputs:
    """What every (group, ratio) trial shares: the prepared model, the eval feeds and the unpruned reference."""

    prepared: bytes
    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    reference: dict[str, np.ndarray]
    baseline: float
    scores: dict[int, np.ndarray]  # unit scores per group, from structured-sparse's `importance`
    calibration: dict[str, np.ndarray] | None
    recover: str


def _trial(inputs: _TrialInputs, params: dict) -> dict:
    """One sweep point: prune group `params["group"]` alone at `params["ratio"]` with structured-sparse's own
    selection, removal and recovery (`remove_and_recover`), and measure the metric."""
    from passes.graph.calibrated import remove_and_recover
    from passes.graph.groups import analyze
    from passes.graph.selection import Targets, choose, removed_roots

    analysis = analyze(onnx.load_from_string(inputs.prepared))  # removal edits the analysed graph: a fresh one
    others = {g.id: "not under test" for g in analysis.groups if g.id != params["group"]}
    decisions = choose(analysis, inputs.scores, Targets(params["ratio"], "uniform", 1, 1, False), others)
    removed = removed_roots(decisions)
    kept = int(decisions[params["group"]].keep.sum())
    value = inputs.baseline
    if removed:
        pruned = remove_and_recover(analysis, removed, inputs.calibration, inputs.recover, 1e-5, 8)[0]
        value = _metric(run_ort(pruned, inputs.feeds), inputs.reference, inputs.labels)
    return {"kept": kept, "metric": round(value, 6), "drop": round(inputs.baseline - value, 6)}


def sensitivity(model: onnx.ModelProto, evaluation: dict[str, np.ndarray], *,
                ratios: tuple[float, ...] = DEFAULT_RATIOS, criterion: str = "auto", recover: str = "auto",
                calibration: dict[str, np.ndarray] | None = None,
                progress: Callable[[str], None] | None = None, workers: int = 1, address: str | None = None) -> dict:
    """Prune each prunable group alone at each ratio; returns the metric, its baseline and the sorted groups.

    The pruning is structured-sparse's own (`passes.graph.calibrated.importance` ranks the units,
    `remove_and_recover` removes them and, with calibration data, refits the layers that read them), so a
    group's drop here is what the pass would cost at that ratio. criterion/recover "auto" mean reconstruction/lsq
    with calibration data, l1/none without. The (group, ratio) trials are the points of a sweep
    (optimizer.sweep.engine): `workers`/`address` spread them over a local Ray or a cluster, with the same result.

        >>> sensitivity(model, {"input": x, "labels": y}, ratios=(0.5,))["groups"][0]["ratios"]["0.5"]["drop"]
    """
    from optimizer.sweep.engine import execute
    from passes.graph.calibrated import DATA_CRITERIA, importance
    from passes.graph.data_scores import capture
    from passes.graph.groups import analyze
    from passes.graph.importance import CRITERIA
    from passes.structured_sparse import prepare

    criterion = criterion if criterion != "auto" else ("reconstruction" if calibration is not None else "l1")
    recover = recover if recover != "auto" else ("lsq" if calibration is not None else "none")
    allowed = tuple(c for c in (*DATA_CRITERIA, *CRITERIA) if c != "zero")
    if criterion not in allowed:
        raise UsageError(f"--criterion {criterion!r}: use one of auto, {', '.join(allowed)}")
    if recover not in ("none", "lsq", "mean"):
        raise UsageError(f"--recover {recover!r}: use one of auto, none, lsq, mean")
    if calibration is None and (criterion in DATA_CRITERIA or recover != "none"):
        raise UsageError(f"--criterion {criterion} / --recover {recover} need --calibration data")
    feeds, labels = split_labels(evaluation)
    cal = split_labels(calibration)[0] if calibration is not None else None
    reference = run_ort(model, feeds)
    baseline = _metric(reference, reference, labels)
    prepared = prepare(model)
    first = analyze(prepared)
    stats, grams, _ = capture(first, prepared, cal, criterion == "reconstruction") if cal is not None \
        else (None, [], None)
    scores = {gid: s for gid, (s, _) in importance(first, criterion, model, stats, grams)[0].items()}
    groups = [g for g in first.groups if g.prunable.any()]
    points = [{"group": g.id, "ratio": ratio} for g in groups for ratio in ratios]
    names = {g.id: g.name for g in groups}

    def on_result(index: int, result: dict, finished: int, total: int) -> None:
        if progress is not None:
            progress(f"{finished}/{total} group {names[result['params']['group']]} at {result['params']['ratio']:g}")

    inputs = _TrialInputs(prepared.SerializeToString(), feeds, labels, reference, baseline, scores, cal, recover)
    outcome = execute(_trial, points, inputs, workers=workers, address=address, on_result=on_result)
    if outcome.interrupted:
        raise KeyboardInterrupt
    failed = next((r for r in outcome.results if not r["ok"]), None)
    if failed is not None:
        raise PassError(f"sensitivity: group {names[failed['params']['group']]} at ratio "
                        f"{failed['params']['ratio']:g}: {failed['error']}")
    rows = []
    for number, group in enumerate(groups):
        trials = outcome.results[number * len(ratios):(number + 1) * len(ratios)]
        drops = {f"{ratio:g}": {k: trial[k] for k in ("kept", "metric", "drop")}
                 for ratio, trial in zip(ratios, trials, strict=True)}
        rows.append({"group": group.id, "name": group.name, "producers": group.producers,
                     "channels": group.channels, "ratios": drops})
    rows.sort(key=lambda row: -max(r["drop"] for r in row["ratios"].values()))
    return {"metric": "top1" if labels is not None else "cosine", "baseline": round(baseline, 6),
            "criterion": criterion, "recover": recover, "ratios": list(ratios), "groups": rows}


def print_sensitivity(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sensitivity: {result['metric']} drop when one group is pruned "
                        f"(baseline {result['baseline']:.4f}, criterion {result['criterion']}, "
                        f"recover {result.get('recover', 'none')})", title_justify="left")
    table.add_column("group")
    table.add_column("channels", justify="right")
    for ratio in result["ratios"]:
        table.add_column(f"drop @ {ratio:g}", justify="right")
    for row in result["groups"]:
        table.add_row(row["name"], str(row["channels"]),
                      *[f"{row['ratios'][f'{r:g}']['drop']:+.4f}" for r in result["ratios"]])
    Console(highlight=False, width=140, markup=False).print(table)  # group names come from the model
