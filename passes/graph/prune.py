"""Carry out a removal: every node that touches a changed channel space slices its own parameters."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.graph.channels import OPAQUE
from passes.graph.groups import Analysis
from passes.graph.handlers import handler_for


class RemovalCut:
    """The `Cut` handlers see: keep masks per tensor and the constants that removed channels carried."""

    def __init__(self, analysis: Analysis, removed: set[int]):
        self._analysis = analysis
        self._removed = np.array(sorted(removed), dtype=np.int64)
        self._masks: dict[str, np.ndarray | None] = {}
        self.notes: dict[str, list[str]] = {}

    def keep(self, tensor: gs.Tensor) -> np.ndarray | None:
        return self.keep_named(tensor.name)

    def keep_named(self, name: str) -> np.ndarray | None:
        if name not in self._masks:
            space = self._analysis.state.spaces.get(name)
            mask = None
            if space is not None:
                roots = self._analysis.root_ids(space.ids)
                mask = (space.ids == OPAQUE) | ~np.isin(roots, self._removed)
                mask = None if mask.all() else mask
            self._masks[name] = mask
        return self._masks[name]

    def removed_constants(self, tensor: gs.Tensor) -> tuple[np.ndarray, np.ndarray]:
        keep = self.keep(tensor)
        if keep is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        values = self._analysis.state.spaces[tensor.name].values
        positions = np.flatnonzero(~keep & np.isfinite(values) & (values != 0))
        return positions, values[positions]

    def note(self, node: gs.Node, text: str) -> None:
        self.notes.setdefault(node.name, []).append(text)


def apply_removal(analysis: Analysis, removed: set[int]) -> tuple[onnx.ModelProto, dict[str, list[str]]]:
    """Remove the units whose roots are in `removed`; returns the new model and per-node notes.

    The analysis' view is edited in place, so an Analysis serves one removal.
    """
    cut = RemovalCut(analysis, removed)
    view = analysis.view
    for node in view.nodes:
        touched = any(cut.keep(t) is not None for t in list(node.inputs) + list(node.outputs) if t.name)
        if touched:
            handler_for(node, view.opset).prune(node, analysis.state, cut)
    return view.to_model(), cut.notes


def kept_counts(analysis: Analysis, removed: set[int]) -> dict[str, tuple[int, int]]:
    """tensor -> (channels before, channels after) for every tensor that carries a channel space."""
    cut = RemovalCut(analysis, removed)
    counts = {}
    for name, space in analysis.state.spaces.items():
        keep = cut.keep_named(name)
        counts[name] = (len(space), len(space) if keep is None else int(keep.sum()))
    return counts
