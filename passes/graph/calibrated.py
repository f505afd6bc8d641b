"""The calibration-data side of structured pruning: unit importance and sensitivity for every criterion, the
removal followed by recovery, which layers to refit, and the phase timer. The structured-sparse pass and
`optimize sensitivity` both go through `importance` and `remove_and_recover`, so there is one algorithm.

`refit_targets` lists, before the removal edits the analysed graph, every layer that reads a pruned channel
(the consumers of the pruned groups) and every grouped/depthwise Conv whose channels shrink, with the mask of
its ORIGINAL output channels that survive (what recovery fits against).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import onnx

from passes.graph.data_scores import activation_scores
from passes.graph.groups import Analysis
from passes.graph.handler import attr
from passes.graph.importance import batchnorm_scales, unit_scores
from passes.graph.prune import RemovalCut, apply_removal
from passes.graph.reconstruction import group_curves, marginal_costs, obs_scores
from passes.graph.recovery import Recovery, recover

DATA_CRITERIA = ("activation", "reconstruction")

REFIT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def refit_targets(analysis: Analysis, removed: set[int], frozen: frozenset[str] = frozenset()
                  ) -> tuple[list[str], dict[str, np.ndarray]]:
    """(layer node names in graph order, node -> keep mask over its original output channels); the nodes named
    in `frozen` are never refitted."""
    cut = RemovalCut(analysis, removed)
    by_name = {n.name: n for n in analysis.view.nodes}
    wanted = {t.node for t in analysis.state.consumers if cut.keep_named(t.tensor) is not None}
    for node in analysis.view.nodes:
        if node.op == "Conv" and attr(node, "group", 1) > 1 and node.outputs and \
                cut.keep_named(node.outputs[0].name) is not None:
            wanted.add(node.name)
    names = [n.name for n in analysis.view.nodes if n.name in wanted - frozen and n.op in REFIT_OPS
             and not (n.op == "MatMul" and analysis.view.constant(n.inputs[1]) is None
                      and analysis.view.constant(n.inputs[0]) is None)]
    keep = {}
    for name in names:
        mask = cut.keep_named(by_name[name].outputs[0].name)
        if mask is not None:
            keep[name] = mask
    return names, keep


class Phases:
    """Seconds per named phase: `with phases("selection"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


FIXED_ORDER_NOTE = "an embedding table's rank: ranked by singular value, not refitted"


def importance(analysis: Analysis, criterion: str, model: onnx.ModelProto, stats, grams,
               fixed: dict[int, np.ndarray] | None = None) -> tuple[dict, dict]:
    """(group -> (scores, note), group -> sensitivity per unit) for the criterion. With calibration data the
    sensitivity is the measured refitted-error curve of each group along its removal order (reconstruction.py);
    without, a group's scores divided by their mean. `fixed` gives groups whose scores are set whatever the
    criterion (a factored embedding's singular values, see embedding_factor): with data they cost their
    activation sensitivity, the error of removing them without a refit, which is what they get."""
    fixed = fixed or {}
    if criterion in DATA_CRITERIA:
        data = activation_scores(analysis, stats)
        scored = {g: (s, note) for g, (s, _, note) in data.items()}
        sens = {g: r for g, (_, r, _) in data.items()}
        if criterion == "reconstruction":
            obs = obs_scores(analysis, grams)
            for group in analysis.groups:
                if all(int(r) in obs for r in group.roots):
                    scored[group.id] = (np.array([obs[int(r)] for r in group.roots]), None)
        if grams:
            orders = {g.id: [int(i) for i in np.argsort(scored[g.id][0], kind="stable") if g.prunable[i]]
                      for g in analysis.groups if g.id not in fixed}
            for gid, curve in group_curves(analysis, grams, orders).items():
                per_unit = np.zeros(len(scored[gid][0]))
                per_unit[orders[gid]] = marginal_costs(curve)
                sens[gid] = per_unit
    else:
        data = activation_scores(analysis, stats) if stats is not None and fixed else {}
        folded_bn = batchnorm_scales(model) if criterion == "bn-scale" else {}
        scored = unit_scores(analysis, "l1" if criterion == "zero" else criterion, folded_bn)
        sens = {gid: _relative(values) for gid, (values, _) in scored.items()}
    for gid, values in fixed.items():
        scored[gid] = (values, FIXED_ORDER_NOTE)
        measured = data[gid][1] if gid in data else None
        # without a consumer's calibration activations, the scores' own relative size
        sens[gid] = measured if measured is not None and measured.any() else _relative(values)
    return scored, sens


def _relative(values: np.ndarray) -> np.ndarray:
    """Scores divided by their mean: the sensitivity of a norm-based criterion."""
    mean = values.mean() if values.size and values.mean() > 0 else 1.0
    return values / mean


def remove_and_recover(analysis: Analysis, removed: set[int], feeds: dict | None, mode: str, ridge: float | None,
                       stages: int, frozen: frozenset[str] = frozenset()
                       ) -> tuple[onnx.ModelProto, dict[str, list[str]], Recovery | None]:
    """Remove the units (`analysis` serves one removal) and, unless mode is none, refit the layers that read
    them (except those named in `frozen`) against the analysed model's outputs on `feeds`. Returns (model,
    per-node notes, recovery or None)."""
    prepared = analysis.view.source
    layers, keep = refit_targets(analysis, removed, frozen)
    pruned, notes = apply_removal(analysis, removed)
    if mode == "none" or not layers or feeds is None:
        return pruned, notes, None
    result = recover(prepared, pruned, layers, keep, feeds, mode=mode, ridge=ridge, max_stages=stages)
    return result.model, notes, result
