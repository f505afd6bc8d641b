"""Data-aware importance: what each unit contributes to its consumers' outputs on the calibration data.

For every consumer term (a layer that reduces the channels of a tensor: Conv, Gemm, MatMul...), position p
of the input gets

    contribution[p] = ||W[:, p]|| * ||X_p||        (Wanda: weight column norm times activation norm)

where ||X_p|| is the channel's L2 norm over all calibration rows (captured with onnxruntime) and ||W[:, p]||
the norm of the weights that read it (over outputs and kernel taps). A unit's `activation` score sums this over
every consumer position it holds. Its *sensitivity* is the relative squared output error its removal causes,
summed over consumers, sum_p contribution[p]^2 / ||Y_consumer||^2: a number that compares across layers, so
global allocation (budgets) can rank units of different groups against each other.

    >>> stats = capture_stats(analysis, model, feeds)            # doctest: +SKIP
    >>> scores, sens = activation_scores(analysis, stats)        # doctest: +SKIP
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx

from passes.graph import activations
from passes.graph.groups import Analysis
from passes.graph.handler import attr


@dataclass
class ConsumerStats:
    """Per consumer term: the channel L2 norms of its input (one per position) and its output energy."""

    node: str
    tensor: str
    input_norms: np.ndarray
    output_energy: float


def _weight_column_norms(analysis: Analysis, node_name: str, tensor: str, length: int) -> np.ndarray | None:
    """||W[:, p]|| for each position p of the consumed tensor; None when the consumer has no constant weight."""
    view = analysis.view
    node = next((n for n in view.nodes if n.name == node_name), None)
    if node is None:
        return None
    if node.op in ("Conv", "ConvTranspose"):
        w = view.input_constant(node, 1)
        if w is None:
            return None
        axis = 1 if node.op == "Conv" else 0
        moved = np.moveaxis(w.astype(np.float64), axis, 0).reshape(w.shape[axis], -1)
    elif node.op == "Gemm":
        b = view.input_constant(node, 1)
        if b is None:
            return None
        bk = b.T if attr(node, "transB", 0) else b
        moved = attr(node, "alpha", 1.0) * bk.astype(np.float64)
    elif node.op == "MatMul":
        wa, wb = view.constant(node.inputs[0]), view.constant(node.inputs[1])
        if wb is not None and wb.ndim == 2:
            moved = wb.astype(np.float64)
        elif wa is not None and wa.ndim == 2:
            moved = wa.T.astype(np.float64)
        else:
            return None
    else:
        return None
    if moved.shape[0] != length:
        return None
    return np.sqrt(np.einsum("ij,ij->i", moved, moved))


def capture_stats(analysis: Analysis, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[ConsumerStats]:
    """Stream the calibration data once through `model` (the analysed one) and reduce every consumer's input
    to per-channel norms and its output to an energy."""
    state = analysis.state
    by_name = {n.name: n for n in analysis.view.nodes}
    terms = [t for t in state.consumers if t.node in by_name and by_name[t.node].outputs]
    outputs = {t.node: by_name[t.node].outputs[0].name for t in terms}
    names = sorted({t.tensor for t in terms} | set(outputs.values()))
    squares: dict[str, np.ndarray] = {}
    energy: dict[str, float] = defaultdict(float)
    if not names:
        return []
    for chunk in activations.stream(model, feeds, names):
        for t in terms:
            space = state.spaces[t.tensor]
            x = chunk[t.tensor].astype(np.float64)
            axes = tuple(i for i in range(x.ndim) if i != space.axis)
            sq = np.einsum("...->", x * x) if x.ndim == 0 else np.sum(x * x, axis=axes)
            squares[t.tensor] = squares.get(t.tensor, 0) + sq
        for out in set(outputs.values()):
            y = chunk[out].astype(np.float64)
            energy[out] += float(np.sum(y * y))
    return [ConsumerStats(t.node, t.tensor, np.sqrt(squares[t.tensor]), energy[outputs[t.node]]) for t in terms]


def activation_scores(analysis: Analysis, stats: list[ConsumerStats]
                      ) -> dict[int, tuple[np.ndarray, np.ndarray, str | None]]:
    """group id -> (activation score per unit, sensitivity per unit, a note when a fallback was used)."""
    state = analysis.state
    score: dict[int, float] = defaultdict(float)
    sens: dict[int, float] = defaultdict(float)
    for entry in stats:
        space = state.spaces[entry.tensor]
        columns = _weight_column_norms(analysis, entry.node, entry.tensor, len(space))
        if columns is None:  # a product of two activations: the other operand's norm stands in for the weight
            columns = np.ones(len(space))
        contribution = columns * entry.input_norms
        roots = analysis.root_ids(space.ids)
        for root, value in zip(roots.tolist(), contribution.tolist(), strict=True):
            if root >= 0:
                score[root] += value
                sens[root] += value * value / max(entry.output_energy, 1e-30)
    result = {}
    for group in analysis.groups:
        values = np.array([score.get(int(r), 0.0) for r in group.roots])
        relative = np.array([sens.get(int(r), 0.0) for r in group.roots])
        note = None
        if not values.any():
            note = "no consumer with calibration activations: ranked by nothing (all zero)"
        result[group.id] = (values, relative, note)
    return result
