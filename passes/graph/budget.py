"""Budgets: choose every group's cut so that the model keeps a given fraction of its weights or MACs.

`CostModel` estimates, from the removal masks alone (no graph edit), the weights and MACs left: every constant
of every node is sliced along the axes that carry a pruned channel space (a Conv weight by its output and,
ungrouped, its input channels; a bias or per-channel scale by its channels), and every Conv/Gemm/MatMul's MACs
scale with the kept fraction of the channels it produces and reduces. `allocate` ranks the removable units of
all groups by sensitivity (the relative output error a removal causes, see `data_scores`) per share of the model
it saves (weights and MACs together), and bisects on how many of that ranking to remove until the estimate meets
the budget, with min_channels and round_to respected inside every trial.

    >>> decisions, reached = allocate(analysis, open_ones, sens, cost, [Budget("params", 0.6, n, n)], finish)
    ... # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from passes.graph.channels import OPAQUE
from passes.graph.groups import Analysis
from passes.graph.handler import attr

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_FLOAT_KINDS = "f"


@dataclass
class _Constant:
    size: int
    dims: list[int]
    sliced: list[tuple[int, str]]  # (constant axis, tensor whose space slices it)
    per_group: tuple[int, str, int] | None = None  # (axis, tensor, groups): the axis holds one group's share of it


@dataclass
class _Macs:
    base: float
    scaled_by: list[str]  # tensors whose kept fraction scales this node's MACs


def _static(shape) -> list[int] | None:
    if shape is None:
        return None
    return [d if isinstance(d, int) and d > 0 else 1 for d in shape]


class CostModel:
    """Weights and MACs of the analysed graph as functions of the removal (see the module doc)."""

    def __init__(self, analysis: Analysis, embeddings: bool = True, shapes=None):
        self.analysis = analysis
        self.embeddings = embeddings  # False: Gather tables are left out of the weights
        # static shapes at the calibration data's sizes (optimizer.report.Shapes): where the model's dims are
        # dynamic (a recognizer's width) the graph's own shapes would count every Conv as if its output were 1x1
        self.static_shapes = shapes
        self.constants: dict[str, _Constant] = {}
        self.macs: list[_Macs] = []
        view = analysis.view
        spaces = analysis.state.spaces
        for node in view.nodes:
            self._node_constants(node, spaces)
            self._node_macs(node, spaces)
        self.params_total = sum(c.size for c in self.constants.values())
        self.macs_total = sum(m.base for m in self.macs)

    def _node_constants(self, node, spaces) -> None:
        view = self.analysis.view
        out = node.outputs[0].name if node.outputs else None
        for index, tensor in enumerate(node.inputs):
            value = view.constant(tensor)
            if value is None or value.dtype.kind not in _FLOAT_KINDS or tensor.name in self.constants:
                continue
            if not self.embeddings and node.op == "Gather" and index == 0:
                continue
            sliced = self._sliced_axes(node, index, value, out, spaces)
            per_group = None
            if node.op == "Conv" and index == 1 and self.analysis.state.in_alternate(node):
                per_group = (1, node.inputs[0].name, attr(node, "group", 1))  # pruned channel by channel
            self.constants[tensor.name] = _Constant(int(value.size), list(value.shape), sliced, per_group)

    def _sliced_axes(self, node, index, value, out, spaces) -> list[tuple[int, str]]:
        x = node.inputs[0].name if node.inputs else None
        op, groups = node.op, attr(node, "group", 1)
        if op == "Conv" and index == 1:
            return [(0, out)] + ([(1, x)] if groups == 1 else [])
        if op == "ConvTranspose" and index == 1:
            return [(0, x)] + ([(1, out)] if groups == 1 else [])
        if op in ("Conv", "ConvTranspose") and index == 2:
            return [(0, out)]
        if op == "Gemm" and index == 1 and value.ndim == 2:
            k_axis = 1 if attr(node, "transB", 0) else 0
            return [(k_axis, x), (1 - k_axis, out)]
        if op == "MatMul" and value.ndim == 2:
            other = node.inputs[1 - index].name
            return [(0, other), (1, out)] if index == 1 else [(1, other), (0, out)]
        if op in ("BatchNormalization", "InstanceNormalization") and value.ndim == 1:
            return [(0, out)]
        space = spaces.get(out) if out else None
        if space is None or value.ndim == 0:
            return []
        rank = self.analysis.view.rank(node.outputs[0])
        aligned = space.axis - (rank - value.ndim) if rank is not None else -1
        if 0 <= aligned < value.ndim and value.shape[aligned] == len(space):
            return [(aligned, out)]
        return []

    def _shape(self, tensor) -> list[int] | None:
        static = self.static_shapes.of(tensor.name) if self.static_shapes is not None else None
        return static if static is not None else _static(self.analysis.view.shape(tensor))

    def _node_macs(self, node, spaces) -> None:
        if node.op not in MAC_OPS or not node.outputs:
            return
        view = self.analysis.view
        out_shape = self._shape(node.outputs[0])
        if out_shape is None:
            return
        out, x = node.outputs[0].name, node.inputs[0].name
        if node.op in ("Conv", "ConvTranspose"):
            w = view.input_constant(node, 1)
            if w is None:
                return
            if node.op == "Conv":
                base = math.prod(out_shape) * math.prod(w.shape[1:])
            else:
                in_shape = self._shape(node.inputs[0])
                base = math.prod(in_shape or [0]) * math.prod(w.shape[1:])
            reduces = attr(node, "group", 1) == 1 or self.analysis.state.in_alternate(node)
            scaled = [out, x] if reduces else [out]
        elif node.op == "Gemm":
            b = view.input_constant(node, 1)
            a_shape = self._shape(node.inputs[0])
            if a_shape is None or len(a_shape) != 2:
                return
            k = a_shape[0] if attr(node, "transA", 0) else a_shape[1]
            if b is None:
                return
            base, scaled = math.prod(out_shape) * k, [out, x]
        else:  # MatMul: counted like the report does, only with a constant second operand
            a_shape = self._shape(node.inputs[0])
            if a_shape is None or view.constant(node.inputs[1]) is None:
                return
            base, scaled = math.prod(out_shape) * a_shape[-1], [out, x]
        self.macs.append(_Macs(float(base), scaled))

    def fractions(self, removed: set[int]) -> dict[str, np.ndarray]:
        """tensor -> keep mask over its space, for tensors that lose channels."""
        removed_arr = np.array(sorted(removed), dtype=np.int64)
        masks = {}
        for name, space in self.analysis.state.spaces.items():
            roots = self.analysis.root_ids(space.ids)
            keep = (space.ids == OPAQUE) | ~np.isin(roots, removed_arr)
            if not keep.all():
                masks[name] = keep
        return masks

    def params(self, masks: dict[str, np.ndarray]) -> float:
        total = 0.0
        for constant in self.constants.values():
            dims = list(constant.dims)
            for axis, tensor in constant.sliced:
                mask = masks.get(tensor)
                if mask is not None and len(mask) == dims[axis]:
                    dims[axis] = int(mask.sum())
            if constant.per_group is not None:
                axis, tensor, groups = constant.per_group
                mask = masks.get(tensor)
                if mask is not None and len(mask) == dims[axis] * groups:
                    dims[axis] = int(mask.sum()) // groups
            total += math.prod(dims)
        return total

    def mac_count(self, masks: dict[str, np.ndarray]) -> float:
        total = 0.0
        for entry in self.macs:
            factor = 1.0
            for tensor in entry.scaled_by:
                mask = masks.get(tensor)
                if mask is not None:
                    factor *= mask.mean()
            total += entry.base * factor
        return total


def unit_savings(analysis: Analysis, cost: CostModel, candidates: dict[int, np.ndarray],
                 metrics: tuple[str, ...] = ("params", "macs")) -> dict[int, np.ndarray]:
    """group id -> the share of the model that removing each candidate unit alone saves: its share of the weights
    plus its share of the MACs (when MACs can be counted; `metrics` names the shares counted), so that a cut for
    either budget is ranked by what it saves in both - a weight budget met only from the last, heavy-weight and
    light-compute layers would leave the model as slow as before."""
    params_full, macs_full = cost.params({}), cost.mac_count({})
    savings = {}
    for group in analysis.groups:
        if group.id not in candidates:
            continue
        per_unit = np.zeros(group.channels)
        # every unit of a group touches the same members, so one probe per group gives its saving per unit
        probe = int(np.flatnonzero(candidates[group.id])[0]) if candidates[group.id].any() else None
        if probe is not None:
            masks = cost.fractions({int(group.roots[probe])})
            share = 0.0
            if "params" in metrics:
                share += (params_full - cost.params(masks)) / max(params_full, 1e-9)
            if "macs" in metrics and macs_full > 0:
                share += (macs_full - cost.mac_count(masks)) / macs_full
            per_unit[:] = max(share, 1e-12)
        savings[group.id] = per_unit
    return savings


@dataclass(frozen=True)
class Budget:
    """keep `fraction` of the model's `metric` (params or macs); `total` is the model's own count of it, `start`
    the count once it is prepared (BatchNorm folded: fewer weights before anything is pruned)."""

    metric: str
    fraction: float
    total: float
    start: float


def _ranking(decisions, sens: dict[int, np.ndarray], savings: dict[int, np.ndarray], min_channels: int,
             max_ratio: float = 1.0, steps: dict[int, int] | None = None) -> list[tuple[float, int, list[int]]]:
    """(key, decision index, units) over all open groups, cheapest first. A group's units come in its own order
    (lowest score first), in chunks of its step (round_to) so that every prefix keeps aligned widths, with keys
    made non-decreasing so that any prefix is a per-group prefix."""
    ranked = []
    for d, decision in enumerate(decisions):
        group = decision.group
        multiple = (steps or {}).get(group.id, 1)
        order = [int(i) for i in np.argsort(decision.scores, kind="stable") if group.prunable[i]]
        limit = min(group.channels - max(min_channels, 1), math.floor(max_ratio * group.channels))
        start = group.channels % multiple  # the first chunk makes the kept width a multiple of the step
        chunks = [order[:start]] if start else []
        chunks += [order[i:i + multiple] for i in range(start, len(order), multiple)]
        running, taken = 0.0, 0
        for chunk in chunks:
            if not chunk or taken + len(chunk) > max(0, limit) or len(chunk) < multiple and chunk is not chunks[0]:
                break
            taken += len(chunk)
            key = sum(float(sens[group.id][u]) for u in chunk) / sum(float(savings[group.id][u]) for u in chunk)
            running = max(running, key)
            ranked.append((running, d, chunk))
    ranked.sort(key=lambda item: item[0])
    return ranked


def allocate(analysis: Analysis, decisions: list, sens: dict[int, np.ndarray], cost: CostModel,
             budgets: list[Budget], finish, min_channels: int = 1, max_ratio: float = 1.0,
             steps: dict[int, int] | None = None, measured: bool = True) -> tuple[list, list[float]]:
    """Set `keep` of the open decisions so the estimated kept fractions meet every budget (weights and/or MACs);
    returns the decisions and the estimate for each budget. `finish(decisions)` applies round_to/min_channels
    and restores non-empty tensors. With `measured` sensitivities (calibration data, output gains) units are
    ranked by what they save in weights and MACs together; with norm-based ones only by the budgets' own
    metrics (a norm cannot tell which early, compute-heavy layer may lose channels)."""
    open_ones = [d for d in decisions if d.group.prunable.any() and d.status == "unchanged"]
    candidates = {d.group.id: d.group.prunable for d in open_ones}
    metrics = ("params", "macs") if measured else tuple(dict.fromkeys(b.metric for b in budgets))
    savings = unit_savings(analysis, cost, candidates, metrics)
    ranked = _ranking(open_ones, sens, savings, min_channels, max_ratio, steps)

    def trial(count: int) -> list[float]:
        for decision in open_ones:
            decision.keep[:] = True
        for _, d, units in ranked[:count]:
            open_ones[d].keep[units] = False
        finish(decisions)
        masks = cost.fractions({int(r) for x in decisions for r in x.group.roots[~x.keep]})
        fractions = []
        for budget in budgets:
            total = cost.params_total if budget.metric == "params" else cost.macs_total
            left = cost.params(masks) if budget.metric == "params" else cost.mac_count(masks)
            fractions.append((budget.start - (total - left)) / budget.total)
        return fractions

    def over(fractions: list[float]) -> float:  # how far the worst budget is missed (<= 0: all met)
        return max(f - b.fraction for f, b in zip(fractions, budgets, strict=True))

    low, high = 0, len(ranked)
    deepest = trial(high)
    if over(deepest) > 0:
        return decisions, deepest
    while low < high:
        middle = (low + high) // 2
        if over(trial(middle)) <= 0:
            high = middle
        else:
            low = middle + 1
    # the smallest cut that meets the budgets, or one unit less when that lands closer to them
    best = trial(low)
    if low > 0:
        under = trial(low - 1)
        if abs(over(under)) < abs(over(best)) and over(under) < 0.01:
            return decisions, under
        best = trial(low)
    return decisions, best
