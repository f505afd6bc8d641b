"""Least-squares recovery: refit the layers that read pruned channels so they reproduce the original outputs.

For each layer L (Conv, grouped/depthwise and 1-D/2-D/3-D included, Gemm, MatMul with a constant weight) that
reads a pruned channel space, the new weight and bias solve

    min_W  sum_rows || Z_pruned W - Y_original ||^2 + lam * || W - W_0 ||^2       (bias row not penalised)

where Z_pruned are L's input rows (im2col for Conv) taken from the PRUNED model, already refitted up to L, and
Y_original is L's output in the ORIGINAL model. Layers are fitted in stages along the graph (a layer never
shares a stage with one it depends on), so a layer downstream sees what its refitted predecessors really give
and errors do not pile up. Z^T Z and Z^T Y are accumulated in float64 over calibration chunks. The original model's
targets never change, so it runs once (`cache_targets`) and only the sampled target rows are kept for the stages
(TARGET_CACHE_BYTES; layers past it rerun the original in their stage); memory is those rows, the Gram matrices and
one chunk's captured outputs (CAPTURE_CHUNK_BYTES). The ridge pulls towards the pruned weights W_0, so a layer with
fewer rows than unknowns stays close to what it was (said in a warning). With `ridge=None` each layer picks its
ridge from RIDGES by two-fold cross-validation (the statistics are kept per half of the calibration samples): an
exactly redundant cut keeps the smallest, a fit that would chase 64 samples gets a stronger one. `mode="mean"`
keeps every weight and refits the bias only: what the removed channels contributed on average (and any drift) is
folded into it.

    >>> model, layers = recover(original, pruned, ["conv2"], keep, feeds)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from optimizer.declines import Decline
from passes.graph import activations
from passes.graph.linear import LinearLayer, layer_from_node, sampled_rows

RIDGE = 1e-5       # relative to the mean diagonal of Z^T Z
RIDGE_FEW_ROWS = 1e-2
RIDGES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # tried by cross-validation when no ridge is given


@dataclass
class Normal:
    """Sufficient statistics of one layer's fit: Z^T Z [G, d+1, d+1], Z^T Y [G, d+1, m], sum y^2, rows."""

    zz: np.ndarray
    zy: np.ndarray
    yy: float = 0.0
    rows: int = 0

    @classmethod
    def empty(cls, groups: int, d: int, m: int) -> Normal:
        return cls(np.zeros((groups, d + 1, d + 1)), np.zeros((groups, d + 1, m)))

    def add(self, z: np.ndarray, y: np.ndarray) -> None:
        """z [rows, G, d], y [rows, G, m] (float64)."""
        if not len(z):
            return
        ones = np.ones(z.shape[:2] + (1,))
        za = np.concatenate([z, ones], axis=2).transpose(1, 0, 2)  # [G, rows, d+1]
        yt = y.transpose(1, 0, 2)
        self.zz += za.transpose(0, 2, 1) @ za
        self.zy += za.transpose(0, 2, 1) @ yt
        self.yy += float(np.einsum("ij,ij->", y.reshape(len(y), -1), y.reshape(len(y), -1)))
        self.rows += len(z)

    def __add__(self, other: Normal) -> Normal:
        return Normal(self.zz + other.zz, self.zy + other.zy, self.yy + other.yy, self.rows + other.rows)

    def error(self, w: np.ndarray) -> float:
        """sum ||Z W - Y||^2 for W [G, d+1, m]."""
        fitted = np.einsum("gik,gij,gjk->", w, self.zz, w, optimize=True) - 2 * np.einsum("gij,gij->", w, self.zy)
        return max(float(self.yy + fitted), 0.0)


def solve(normal: Normal, w0: np.ndarray, ridge: float, mode: str = "lsq") -> np.ndarray:
    """The ridge solution towards w0 (mode lsq), or w0 with only its bias row refitted (mode mean)."""
    if mode == "mean":
        w = w0.copy()
        n = normal.zz[:, -1, -1][:, None]
        w[:, -1, :] = (normal.zy[:, -1, :] - np.einsum("gj,gjk->gk", normal.zz[:, -1, :-1], w0[:, :-1, :])) / n
        return w
    d = normal.zz.shape[1] - 1
    diag = np.einsum("gii->gi", normal.zz[:, :-1, :-1]).mean(axis=1)
    lam = ridge * np.maximum(diag, 1e-12)
    penalty = np.zeros((normal.zz.shape[0], d + 1, d + 1))
    idx = np.arange(d)
    penalty[:, idx, idx] = lam[:, None]
    lhs = normal.zz + penalty
    rhs = normal.zy + penalty @ w0
    try:
        return np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        return np.stack([np.linalg.lstsq(a, b, rcond=None)[0] for a, b in zip(lhs, rhs, strict=True)])


@dataclass
class Fitted:
    """What recovery did to one layer (for the report)."""

    node: str
    op: str
    rows: int
    unknowns: int
    error_before: float | None = None  # relative: ||Y_pruned - Y_orig|| / ||Y_orig|| on the calibration data
    error_after: float | None = None
    ridge: float = RIDGE
    skipped: Decline | None = None

    def entry(self) -> dict:
        out = {"node": self.node, "op": self.op, "rows": self.rows, "unknowns": self.unknowns}
        if self.skipped:
            out["skipped"] = self.skipped.as_report()
        else:
            out.update(error_before=round(self.error_before, 6), error_after=round(self.error_after, 6),
                       ridge=self.ridge)
        return out


@dataclass
class Recovery:
    """The result of `recover`: the refitted model, one entry per layer, and warnings to pass on."""

    model: onnx.ModelProto
    layers: list[Fitted]
    warnings: list[str] = field(default_factory=list)


def _editable(pruned: onnx.ModelProto, names: list[str]) -> tuple[onnx.ModelProto, list[LinearLayer], list[Fitted]]:
    """Give each named layer its own weight/bias initializers (a bias added where the op allows one)."""
    from passes.graph.ir import GraphView

    view = GraphView(pruned)
    by_name = {n.name: n for n in view.nodes}
    targets, skipped = {}, []
    for name in names:
        node = by_name.get(name)
        reason = _unfit_reason(name, node, view)
        if reason:
            skipped.append(Fitted(name, reason.op, 0, 0, skipped=reason))
            continue
        view.replace_constant(node, 1, view.input_constant(node, 1))
        target = node.outputs[0]
        if node.op == "MatMul":
            add = _bias_add(node, view)
            if add is None:
                add = view.add_bias_after(node, np.zeros(view.input_constant(node, 1).shape[1],
                                                         dtype=view.input_constant(node, 1).dtype))
            index = 1 if view.constant(add.inputs[1]) is not None else 0
            view.replace_constant(add, index, view.constant(add.inputs[index]))
            targets[name] = (add.outputs[0].name, add.inputs[index].name)
            continue
        if not view.has_input(node, 2):
            out = view.input_constant(node, 1).shape[0 if node.op == "Conv" or node.attrs.get("transB", 0) else 1]
            view.append_constant(node, np.zeros(out, dtype=view.input_constant(node, 1).dtype), "bias")
        else:
            view.replace_constant(node, 2, view.input_constant(node, 2))
        targets[name] = (target.name, node.inputs[2].name)
    model = view.to_model()
    layers = []
    nodes = {n.name: n for n in model.graph.node}
    for name, (target, bias) in targets.items():
        layer = layer_from_node(model, nodes[name], target, bias)
        if layer is None:
            op = nodes[name].op_type
            skipped.append(Fitted(name, op, 0, 0, skipped=Decline(name, op, "weight-not-initializer",
                                                                  "its weight is not an initializer")))
        else:
            layers.append(layer)
    return model, layers, skipped


def _unfit_reason(name: str, node, view) -> Decline | None:
    """Why a layer cannot be refitted (a Decline for the report), or None when it can."""
    if node is None:
        return Decline(name, "?", "not-found", "not found in the pruned model")

    def no(code: str, why: str) -> Decline:
        return Decline(name, node.op, code, why)

    if node.op not in ("Conv", "Gemm", "MatMul"):
        return no("op-not-refitted", f"{node.op} is not refitted (only Conv, Gemm and MatMul with a constant weight)")
    weight = view.input_constant(node, 1)
    if weight is None or view.constant(node.inputs[0]) is not None:
        return no("weight-not-second-input", "its weight is not a constant second input")
    if node.op == "MatMul" and weight.ndim != 2:
        return no("weight-not-matrix", "its constant operand is not a 2-D matrix")
    if node.op == "Gemm" and view.has_input(node, 2):
        c = view.input_constant(node, 2)
        n = weight.shape[0] if node.attrs.get("transB", 0) else weight.shape[1]
        if c is None or c.size not in (1, n) or node.attrs.get("beta", 1.0) == 0:
            return no("bias-not-per-column", "its C operand is not a per-column constant")
    if view.is_graph_input(node.inputs[0]):
        return no("input-unchanged", "its input is a graph input (nothing upstream changed)")
    return None


def _bias_add(node, view):
    """The Add right after a MatMul that adds a constant vector over its columns, if there is one."""
    out = node.outputs[0]
    consumers = view.consumers(out)
    if len(consumers) != 1 or consumers[0].op != "Add" or view.is_graph_output(out):
        return None
    add = consumers[0]
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    value = view.constant(other)
    n = view.input_constant(node, 1).shape[1]
    if value is None or value.size != n or value.shape[-1] != n:
        return None
    return add


def _stages(model: onnx.ModelProto, layers: list[LinearLayer]) -> list[list[LinearLayer]]:
    """Layers in graph order, cut into stages so that no layer depends on another of its stage."""
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def reach(tensor: str) -> set[str]:
        seen, frontier = set(), [tensor]
        while frontier:
            name = frontier.pop()
            if name not in seen:
                seen.add(name)
                frontier.extend(o for node in consumers.get(name, []) for o in node.output)
        return seen

    stages: list[list[LinearLayer]] = []
    downstream: set[str] = set()
    for layer in sorted(layers, key=lambda item: order[item.node]):
        if stages and layer.x not in downstream:
            stages[-1].append(layer)
            downstream |= reach(layer.y)
        else:
            stages.append([layer])
            downstream = reach(layer.y)
    return stages


TARGET_CACHE_BYTES = 1 << 30  # the original's sampled target rows kept across stages; layers past it rerun it
CAPTURE_CHUNK_BYTES = 256 << 20  # the original's full outputs held for one chunk while they are sampled


@dataclass
class Block:
    """One piece of a layer's fit from one calibration chunk: the original's target rows (float32, as ORT gave
    them), the design rows they belong to (None: all), the sample they come from (None: the whole chunk, its
    rows split alternately between the two halves)."""

    targets: np.ndarray
    rows: np.ndarray | None
    sample: int | None


def _target_blocks(layer: LinearLayer, y: np.ndarray, keep: np.ndarray | None, samples: int,
                   rng: np.random.Generator) -> list[Block]:
    """The blocks of one chunk's original output `y` of `layer` (Conv with spatial dims: one per sample)."""
    per_sample = layer.op == "Conv" and y.ndim > 2
    blocks = []
    for j, ys in ((j, y[j:j + 1]) for j in range(len(y))) if per_sample else [(None, y)]:
        t = layer.targets(ys, keep, dtype=np.float32)
        rows = sampled_rows(len(t), layer.unknowns, len(ys), samples, rng)
        blocks.append(Block(t if rows is None else t[rows], rows, j))
    return blocks


def _add_blocks(halves: list[Normal] | None, layer: LinearLayer, x: np.ndarray, blocks: list[Block]
                ) -> list[Normal]:
    """Add one chunk's (pruned input, original target) pairs of `layer` to its two half-statistics."""
    for block in blocks:
        z = layer.rows(x if block.sample is None else x[block.sample:block.sample + 1])
        z = z if block.rows is None else z[block.rows]
        t = block.targets.astype(np.float64)
        if halves is None:
            halves = [Normal.empty(z.shape[1], z.shape[2], t.shape[2]) for _ in range(2)]
        if block.sample is None:
            halves[0].add(z[0::2], t[0::2])
            halves[1].add(z[1::2], t[1::2])
        else:
            halves[block.sample % 2].add(z, t)
    return halves


def _nbytes(blocks: list[Block]) -> int:
    return sum(b.targets.nbytes + (0 if b.rows is None else b.rows.nbytes) for b in blocks)


def _capture_runs(original: onnx.ModelProto, layers: list[LinearLayer], feeds: dict, size: int,
                  limit: int = CAPTURE_CHUNK_BYTES) -> list[list[LinearLayer]]:
    """`layers` (in graph order) cut into consecutive runs whose outputs for one calibration chunk stay under
    `limit` bytes, measured on one sample: capturing every layer's output at once would hold most of the
    model's activations for a whole chunk."""
    one = next(activations.stream(original, {k: v[:1] for k, v in feeds.items()}, [layer.y for layer in layers]))
    first, _ = next(activations.calibration_chunks(original, feeds, size))  # a fixed batch is padded to its size
    step = len(next(iter(first.values())))
    runs: list[list[LinearLayer]] = [[]]
    total = 0
    for layer in layers:
        cost = one[layer.y].nbytes * step
        if runs[-1] and total + cost > limit:
            runs.append([])
            total = 0
        runs[-1].append(layer)
        total += cost
    return runs


def cache_targets(original: onnx.ModelProto, layers: list[LinearLayer], keep: dict, feeds: dict, size: int,
                  rngs: dict[str, np.random.Generator], limit: int = TARGET_CACHE_BYTES,
                  capture_limit: int = CAPTURE_CHUNK_BYTES) -> dict[str, list[list[Block]]]:
    """{layer: its blocks per calibration chunk}, sampled from runs of the original model (one, unless the
    layers' outputs for a chunk pass `capture_limit`) and kept in graph order until `limit` bytes: a layer's
    targets never change while the pruned model is refitted, so stages need not rerun the original for them.
    Layers past the limit are left out (their stages run the original again)."""
    cache: dict[str, list[list[Block]]] = {layer.node: [] for layer in layers}
    samples = len(next(iter(feeds.values())))
    used = 0
    for run in _capture_runs(original, layers, feeds, size, capture_limit):
        run = [layer for layer in run if layer.node in cache]
        if not run:
            break
        for chunk in activations.stream(original, feeds, [layer.y for layer in run], size):
            for layer in run:
                if layer.node in cache:
                    blocks = _target_blocks(layer, chunk[layer.y], keep.get(layer.node), samples, rngs[layer.node])
                    used += _nbytes(blocks)
                    cache[layer.node].append(blocks)
            while used > limit and cache:  # the last layers in graph order go first
                _, dropped = cache.popitem()
                used -= sum(_nbytes(blocks) for blocks in dropped)
    return cache


def _accumulate(original: onnx.ModelProto, pruned: onnx.ModelProto, stage: list[LinearLayer], keep: dict,
                feeds: dict, size: int, rngs: dict[str, np.random.Generator], cache: dict[str, list[list[Block]]]
                ) -> list[tuple[Normal, Normal]]:
    """Normal equations of every layer of a stage, in two halves (even and odd calibration samples; rows
    alternately where a row is not a whole sample): inputs from the pruned model, targets from the original
    (from `cache`, or from a run of the original cut down to the stage's uncached layers)."""
    stats: list[list[Normal] | None] = [None] * len(stage)
    samples = len(next(iter(feeds.values())))
    fresh = [layer.y for layer in stage if layer.node not in cache]
    targets = activations.stream(original, feeds, fresh, size) if fresh else None
    for number, x_chunk in enumerate(activations.stream(pruned, feeds, [layer.x for layer in stage], size)):
        y_chunk = next(targets) if targets is not None else {}
        for i, layer in enumerate(stage):
            blocks = cache[layer.node][number] if layer.node in cache else \
                _target_blocks(layer, y_chunk[layer.y], keep.get(layer.node), samples, rngs[layer.node])
            stats[i] = _add_blocks(stats[i], layer, x_chunk[layer.x], blocks)
    return [(halves[0], halves[1]) for halves in stats]


def cross_validated_ridge(halves: tuple[Normal, Normal], w0: np.ndarray, candidates=RIDGES) -> float:
    """The candidate ridge whose fit on one half best predicts the other (both ways, errors summed)."""
    a, b = halves
    errors = [b.error(solve(a, w0, r)) + a.error(solve(b, w0, r)) for r in candidates]
    return candidates[int(np.argmin(errors))]


def merge_stages(stages: list[list[LinearLayer]], limit: int) -> list[list[LinearLayer]]:
    """At most `limit` stages: consecutive stages are joined (a joined stage fits its later layers from inputs
    whose earlier layers are pruned but not yet refitted), each run of the models costing one pass."""
    if len(stages) <= limit:
        return stages
    bounds = np.linspace(0, len(stages), limit + 1).round().astype(int)
    return [[layer for stage in stages[a:b] for layer in stage] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def recover(original: onnx.ModelProto, pruned: onnx.ModelProto, layers: list[str], keep: dict[str, np.ndarray],
            feeds: dict[str, np.ndarray], *, mode: str = "lsq", ridge: float | None = RIDGE, size: int = 16,
            max_stages: int = 64, progress: Callable[[str], None] | None = None) -> Recovery:
    """Refit `layers` (node names, the same in both models) of `pruned` stage by stage; see the module doc.

    keep: node -> mask over the ORIGINAL output channels that the pruned layer still has (absent: all).
    """
    model, fit_layers, report = _editable(pruned, layers)
    warnings: list[str] = []
    index = {t.name: i for i, t in enumerate(model.graph.initializer)}
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    in_order = sorted(fit_layers, key=lambda layer: order[layer.node])
    # one generator per layer: its sampled rows do not depend on whether its targets were cached
    rngs = {layer.node: np.random.default_rng([0, i]) for i, layer in enumerate(in_order)}
    cache = cache_targets(original, in_order, keep, feeds, size, rngs, TARGET_CACHE_BYTES,
                          CAPTURE_CHUNK_BYTES) if fit_layers else {}
    for number, stage in enumerate(merge_stages(_stages(model, fit_layers), max_stages)):
        if progress is not None:
            progress(f"recovery stage {number + 1}: {', '.join(layer.node for layer in stage)}")
        normals = _accumulate(original, model, stage, keep, feeds, size, rngs, cache)
        for layer, normal in zip(stage, normals, strict=True):
            report.append(_fit_one(model, index, layer, normal, mode, ridge, warnings))
    return Recovery(model, report, warnings)


def _fit_one(model, index, layer: LinearLayer, halves: tuple[Normal, Normal], mode: str, ridge: float | None,
             warnings: list[str]) -> Fitted:
    normal = halves[0] + halves[1]
    unknowns = normal.zz.shape[1]
    few = mode == "lsq" and normal.rows < unknowns
    if ridge is None:  # cross-validated below, once w0 is known
        chosen = None
    else:
        chosen = max(ridge, RIDGE_FEW_ROWS) if few else ridge
    entry = Fitted(layer.node, layer.op, normal.rows, unknowns, ridge=chosen if chosen is not None else RIDGE)
    w0 = layer.weights()
    if chosen is None:
        candidates = tuple(r for r in RIDGES if r >= RIDGE_FEW_ROWS) if few else RIDGES
        usable = mode == "lsq" and halves[0].rows and halves[1].rows
        entry.ridge = cross_validated_ridge(halves, w0, candidates) if usable else candidates[0]
    if few:
        warnings.append(
            f"recovery of {layer.op} {layer.node}: {normal.rows} calibration rows for {unknowns} unknowns per "
            f"output; fitted with a stronger ridge ({entry.ridge:g}) towards the pruned weights - give more "
            "calibration samples for a better fit"
        )
    scale = max(normal.yy, 1e-30)
    entry.error_before = float(np.sqrt(normal.error(w0) / scale))
    w = solve(normal, w0, entry.ridge, mode)
    after = float(np.sqrt(normal.error(w) / scale))
    if not np.all(np.isfinite(w)) or after > entry.error_before:
        w, after = w0, entry.error_before
    entry.error_after = after
    for name, array in layer.write(w).items():
        model.graph.initializer[index[name]].CopyFrom(numpy_helper.from_array(array, name))
    layer.weight_value = numpy_helper.to_array(model.graph.initializer[index[layer.weight]])
    return entry
