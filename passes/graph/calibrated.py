"""The calibration-data side of structured pruning: which layers to refit after a removal, and the phase timer.

`refit_targets` lists, before the removal edits the analysed graph, every layer that reads a pruned channel
(the consumers of the pruned groups) and every grouped/depthwise Conv whose channels shrink, with the mask of
its ORIGINAL output channels that survive (what recovery fits against).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np

from passes.graph.groups import Analysis
from passes.graph.handler import attr
from passes.graph.prune import RemovalCut

REFIT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def refit_targets(analysis: Analysis, removed: set[int]) -> tuple[list[str], dict[str, np.ndarray]]:
    """(layer node names in graph order, node -> keep mask over its original output channels)."""
    cut = RemovalCut(analysis, removed)
    by_name = {n.name: n for n in analysis.view.nodes}
    wanted = {t.node for t in analysis.state.consumers if cut.keep_named(t.tensor) is not None}
    for node in analysis.view.nodes:
        if node.op == "Conv" and attr(node, "group", 1) > 1 and node.outputs and \
                cut.keep_named(node.outputs[0].name) is not None:
            wanted.add(node.name)
    names = [n.name for n in analysis.view.nodes if n.name in wanted and n.op in REFIT_OPS
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
