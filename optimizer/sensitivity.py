"""Pruning sensitivity: prune one channel group at a time, at several ratios, and measure the damage.

The metric is top-1 accuracy when the evaluation data has labels, else the cosine similarity of the outputs
to the unpruned model's. Groups come out sorted by their worst drop, so fragile layers head the list and can
be passed to `structured-sparse:exclude=...`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from optimizer.data import split_labels
from optimizer.errors import UsageError
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


def sensitivity(model: onnx.ModelProto, evaluation: dict[str, np.ndarray], *,
                ratios: tuple[float, ...] = DEFAULT_RATIOS, criterion: str = "l1",
                progress: Callable[[str], None] | None = None) -> dict:
    """Prune each prunable group alone at each ratio; returns the metric, its baseline and the sorted groups."""
    from passes.graph.groups import analyze
    from passes.graph.importance import CRITERIA, unit_scores
    from passes.graph.prune import apply_removal
    from passes.graph.selection import Targets, choose, removed_roots
    from passes.structured_sparse import prepare

    if criterion not in CRITERIA or criterion == "zero":
        raise UsageError(f"--criterion {criterion!r}: use one of {', '.join(c for c in CRITERIA if c != 'zero')}")
    feeds, labels = split_labels(evaluation)
    reference = run_ort(model, feeds)
    baseline = _metric(reference, reference, labels)
    prepared = prepare(model)
    groups = [g for g in analyze(prepared).groups if g.prunable.any()]
    rows = []
    for number, group in enumerate(groups):
        if progress is not None:
            progress(f"group {number + 1}/{len(groups)} {group.name}")
        drops = {}
        for ratio in ratios:
            analysis = analyze(prepared)  # removal edits the analysed graph, so each trial gets a fresh one
            scores = {gid: s for gid, (s, _) in unit_scores(analysis, criterion).items()}
            others = {g.id: "not under test" for g in analysis.groups if g.id != group.id}
            decisions = choose(analysis, scores, Targets(ratio, "uniform", 1, 1, False), others)
            removed = removed_roots(decisions)
            kept = int(decisions[group.id].keep.sum())
            value = _metric(run_ort(apply_removal(analysis, removed)[0], feeds), reference, labels) \
                if removed else baseline
            drops[f"{ratio:g}"] = {"kept": kept, "metric": round(value, 6), "drop": round(baseline - value, 6)}
        rows.append({"group": group.id, "name": group.name, "producers": group.producers,
                     "channels": group.channels, "ratios": drops})
    rows.sort(key=lambda row: -max(r["drop"] for r in row["ratios"].values()))
    return {"metric": "top1" if labels is not None else "cosine", "baseline": round(baseline, 6),
            "criterion": criterion, "ratios": list(ratios), "groups": rows}


def print_sensitivity(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sensitivity: {result['metric']} drop when one group is pruned "
                        f"(baseline {result['baseline']:.4f}, criterion {result['criterion']})", title_justify="left")
    table.add_column("group")
    table.add_column("channels", justify="right")
    for ratio in result["ratios"]:
        table.add_column(f"drop @ {ratio:g}", justify="right")
    for row in result["groups"]:
        table.add_row(row["name"], str(row["channels"]),
                      *[f"{row['ratios'][f'{r:g}']['drop']:+.4f}" for r in result["ratios"]])
    Console(highlight=False, width=140, markup=False).print(table)  # group names come from the model
