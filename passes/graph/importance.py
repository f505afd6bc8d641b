"""How much each unit of a group matters.

Per producer, a unit's weight slice (its output rows) gets a norm; a unit shared by several producers (a
residual group) averages them. Criteria:

- l1, l2: the L1 / L2 norm of the producer rows (filter-norm pruning).
- bn-scale: |gamma| of the BatchNormalization/InstanceNormalization on the channel (network slimming). A BN
  folded into its Conv by cleanup is read from the model before folding (`batchnorm_scales`); a group with no
  normalization falls back to l2, and says so.
- hoyer: the l2 norm divided by the Group-HS trimming threshold sum(l2^2)/sum(l2) of its group (DeepHoyer):
  scale-invariant, so groups compare under scope=global; below 1 is what Group-HS training drives to zero.
- zero: only exact units are removed; the l1 norm is reported.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx

from passes.graph.groups import Analysis

CRITERIA = ("l1", "l2", "bn-scale", "hoyer", "zero")
FOLDABLE_INTO = ("Conv", "ConvTranspose", "Gemm")


def batchnorm_scales(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """|gamma| of every BatchNormalization that directly follows a Conv/ConvTranspose/Gemm, keyed by that
    producer's node name (cleanup folds these BNs into the producer and keeps the producer's name)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {t.name: t for t in model.graph.initializer}
    scales = {}
    for node in model.graph.node:
        producer = producers.get(node.input[0]) if node.op_type == "BatchNormalization" else None
        if producer is not None and producer.name and producer.op_type in FOLDABLE_INTO \
                and node.input[1] in initializers:
            scales[producer.name] = np.abs(onnx.numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64))
    return scales


def _producer_norms(analysis: Analysis, power: int) -> dict[int, list[float]]:
    """root -> one norm per producer that holds the unit."""
    state = analysis.state
    norms: dict[int, list[float]] = defaultdict(list)
    for slices in state.producers:
        space = state.spaces[slices.tensor]
        flat = np.moveaxis(slices.weight, slices.axis, 0).reshape(len(space), -1)
        if power == 1:
            per_position = np.abs(flat).sum(axis=1, dtype=np.float64)
        else:
            per_position = np.einsum("ij,ij->i", flat, flat, dtype=np.float64)
        roots, inverse = np.unique(analysis.root_ids(space.ids), return_inverse=True)
        totals = np.bincount(inverse, weights=per_position)
        for root, total in zip(roots.tolist(), totals.tolist(), strict=True):
            norms[root].append(total if power == 1 else float(np.sqrt(total)))
    return norms


def _norm_scales(analysis: Analysis, folded: dict[str, np.ndarray]) -> dict[int, list[float]]:
    state = analysis.state
    entries = [(n.tensor, n.scales) for n in state.norms]
    entries += [
        (s.tensor, folded[s.node]) for s in state.sources if s.node in folded and folded[s.node].size == s.count
    ]
    scales: dict[int, list[float]] = defaultdict(list)
    for tensor, values in entries:
        for root, value in zip(analysis.root_ids(state.spaces[tensor].ids).tolist(), values.tolist(), strict=True):
            if root >= 0:
                scales[root].append(value)
    return scales


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def unit_scores(
    analysis: Analysis, criterion: str, folded_bn: dict[str, np.ndarray] | None = None
) -> dict[int, tuple[np.ndarray, str | None]]:
    """group id -> (score per unit in canonical order, a note when the criterion fell back to another)."""
    norms = _producer_norms(analysis, 1 if criterion in ("l1", "zero") else 2)
    per_root = {root: _mean(values) for root, values in norms.items()}
    scales = _norm_scales(analysis, folded_bn or {}) if criterion == "bn-scale" else {}
    result = {}
    for group in analysis.groups:
        note = None
        if criterion == "bn-scale" and any(int(r) in scales for r in group.roots):
            scores = np.array([_mean(scales.get(int(r), [0.0])) for r in group.roots])
        else:
            scores = np.array([per_root.get(int(r), 0.0) for r in group.roots])
            if criterion == "bn-scale":
                note = "no normalization on these channels: ranked by the l2 norm of the producer rows"
        if criterion == "hoyer" and scores.sum() > 0:
            scores = scores / (np.square(scores).sum() / scores.sum())
        result[group.id] = (scores, note)
    return result


def summary(scores: np.ndarray, keep: np.ndarray) -> dict:
    """min/mean/max of a group's scores, and the largest removed / smallest kept score."""

    def stat(values: np.ndarray, fn) -> float | None:
        return round(float(fn(values)), 6) if values.size else None

    return {
        "min": stat(scores, np.min),
        "mean": stat(scores, np.mean),
        "max": stat(scores, np.max),
        "removed_max": stat(scores[~keep], np.max),
        "kept_min": stat(scores[keep], np.min),
    }
