"""depth: remove residual blocks, or insert identity-initialised ones (AutoGrow's ZeroInit morphism).

mode=remove (approximate) replaces `x + f(x)` by x for identity residual blocks (passes/graph/residual.py finds
them; projection shortcuts are declined with the reason): the Add's consumers read x, the branch nodes go, a ReLU
after the Add stays. Which blocks: `blocks=` (regex on the Add node names) or `count=N`, the N least important by
the measured ratio RMS(f(x)) / RMS(x) on the calibration inputs, which says how much the block changes its input.

mode=insert (exact) puts a BasicBlock-shaped block after a tensor x of shape [N, C, H, W] (or [N, C, T]):

    y = x + BN2(Conv2(ReLU(BN1(Conv1(x)))))      3x3 (3) kernels, pad 1, stride 1, C -> width -> C

Conv weights are He-normal from the seed, BN1 is the identity transform and BN2 has gamma = beta = 0, so the block
outputs exactly x: this pass changes nothing by itself. It is AutoGrow's grow step with ZeroInit; the block
becomes useful only when the model is trained afterwards (in PyTorch), which the non-zero conv weights allow.
`count=` blocks go one after another at the same place.

Both modes append to the model metadata `sculpt.depth` (a JSON list, one entry per block removed or inserted).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optimizer import keys
from optimizer.activation_stats import ProbeSession
from optimizer.data import random_inputs
from optimizer.errors import PassError, UsageError
from optimizer.model import metadata_value, set_metadata
from optimizer.report import layer_rows, model_stats
from passes import Pass, PassContext, PassResult, option, register
from passes.base import compile_regex
from passes.graph.ir import GraphView
from passes.graph.residual import ResidualBlock, find_residual_blocks, node_label

METADATA_KEY = keys.DEPTH
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


@register
class Depth(Pass):
    name = "depth"
    summary = "removes residual blocks, or inserts identity-initialised ones (AutoGrow's ZeroInit morphism)"
    contract = "approximate"

    @dataclass(frozen=True)
    class Options:
        mode: Literal["remove", "insert"] = option("remove", "remove residual blocks, or insert identity ones")
        blocks: str | None = option(None, "remove: regex on the residual Add node names to remove")
        count: int | None = option(None, "remove: the N least important blocks; insert: blocks in a row (1)")
        after: str | None = option(None, "insert: a tensor name, or a regex on node names (first output taken)")
        width: int | None = option(None, "insert: inner width of the new blocks (default: the tensor's channels)")

    def validate(self) -> None:
        o = self.options
        self.block_pattern = None
        if o.count is not None and o.count < 1:
            raise UsageError(f"pass depth: option count={o.count} must be at least 1")
        if o.mode == "remove":
            if (o.blocks is None) == (o.count is None):
                which = "both were given" if o.blocks is not None else "neither was given"
                raise UsageError(f"pass depth: mode=remove takes exactly one of blocks= (regex) or count=N; {which}")
            for key in ("after", "width"):
                if getattr(o, key) is not None:
                    raise UsageError(f"pass depth: option {key}={getattr(o, key)!r} applies to mode=insert only")
            self.block_pattern = compile_regex(self.name, "blocks", o.blocks)
        else:
            if not o.after:
                raise UsageError("pass depth: mode=insert needs after=<tensor name or node-name regex>")
            if o.blocks is not None:
                raise UsageError(f"pass depth: option blocks={o.blocks!r} applies to mode=remove only")
            if o.width is not None and o.width < 1:
                raise UsageError(f"pass depth: option width={o.width} must be at least 1")

    def contract_for_options(self) -> Literal["exact", "approximate"]:
        return "exact" if self.options.mode == "insert" else "approximate"

    def claims_speedup(self, result: PassResult) -> bool:
        return bool(result.report.get("removed"))

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        if self.options.mode == "remove":
            return PassResult(*self._remove(model, ctx))
        return PassResult(*self._insert(model, ctx))

    # --- remove ---------------------------------------------------------------------------------------------

    def _remove(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict]:
        view = GraphView(model)
        blocks, declined = find_residual_blocks(view)
        if not blocks:
            why = "; ".join(f"{d.node}: {d.why}" for d in declined) or "the model has no Add of two activations"
            raise PassError(f"pass depth: no identity residual block was found ({why})")
        layers = layer_rows(model)
        rows = [_block_row(block, layers) for block in blocks]
        for row, ratio in zip(rows, _importance(model, blocks, ctx), strict=True):
            row["importance"] = ratio
        chosen = self._choose(blocks, rows)
        before = model_stats(model)
        removed = []
        for index in chosen:
            _remove_block(view, blocks[index])
            removed.append(blocks[index].name)
        result = view.to_model()
        entries = [{"mode": "remove", "block": rows[i]["block"], "skip": rows[i]["skip"],
                    "branch_nodes": len(rows[i]["branch_nodes"]), "importance": rows[i]["importance"]}
                   for i in chosen]
        _append_metadata(result, entries)
        after = model_stats(result)
        details = {
            "blocks": rows,
            "removed": removed,
            "declined": [{"block": d.node, "code": d.code, "reason": d.why} for d in declined],
            "before": {k: before[k] for k in ("params", "macs", "nodes")},
            "after": {k: after[k] for k in ("params", "macs", "nodes")},
        }
        return result, details

    def _choose(self, blocks: list[ResidualBlock], rows: list[dict]) -> list[int]:
        """Indices of the blocks to remove (graph order)."""
        if self.block_pattern is not None:
            chosen = [i for i, b in enumerate(blocks) if self.block_pattern.search(b.name)]
            if not chosen:
                names = ", ".join(repr(b.name) for b in blocks)
                raise UsageError(f"pass depth: option blocks={self.options.blocks!r} matches no residual block; "
                                 f"the blocks are: {names}")
            return _outermost(blocks, chosen)
        count = self.options.count
        if count > len(blocks):
            raise UsageError(f"pass depth: option count={count} but the model has only {len(blocks)} identity "
                             "residual block(s)")
        ranked = sorted(range(len(blocks)), key=lambda i: (rows[i]["importance"], i))
        return _outermost(blocks, sorted(ranked[:count]))

    # --- insert ---------------------------------------------------------------------------------------------

    def _insert(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, dict]:
        view = GraphView(model)
        targets = self._insert_targets(view)
        rng = np.random.default_rng(ctx.seed)
        taken = {n.name for n in view.graph.nodes} | set(view.graph.tensors())
        before = model_stats(model)
        places, entries, serial = [], [], 0
        for tensor in targets:
            name = tensor.name  # a graph output's tensor is renamed when a block takes over its name
            channels, dtype, rank = _insert_spec(tensor, self.options.after)
            width = self.options.width or channels
            current, inserted = tensor, []
            for _ in range(self.options.count or 1):
                while any(used.startswith(f"depth/insert{serial}/") for used in taken):
                    serial += 1
                prefix = f"depth/insert{serial}"
                serial += 1
                current, nodes = _insert_block(view, current, prefix, channels, width, rank - 2, dtype, rng)
                taken.update(n.name for n in nodes)
                params = sum(t.values.size for n in nodes for t in n.inputs if isinstance(t, gs.Constant))
                inserted.append({"block": prefix, "nodes": [n.name for n in nodes], "params": int(params)})
                entries.append({"mode": "insert", "block": prefix, "after": name, "width": width,
                                "seed": ctx.seed})
            places.append({"after": name, "shape": list(view.shape(tensor) or []), "width": width,
                           "blocks": inserted})
        result = view.to_model()
        _append_metadata(result, entries)
        after = model_stats(result)
        details = {
            "inserted": places,
            "init": "He-normal conv weights; BN1 identity; BN2 gamma = beta = 0 (ZeroInit: each block outputs x)",
            "before": {k: before[k] for k in ("params", "macs", "nodes")},
            "after": {k: after[k] for k in ("params", "macs", "nodes")},
        }
        return result, details

    def _insert_targets(self, view: GraphView) -> list[gs.Tensor]:
        after = self.options.after
        tensor = view.tensors.get(after)
        if tensor is not None:
            return [tensor]
        pattern = compile_regex(self.name, "after", after)
        targets = [n.outputs[0] for n in view.graph.nodes if n.outputs and pattern.search(node_label(n))]
        if not targets:
            raise UsageError(f"pass depth: option after={after!r} names no tensor and matches no node name")
        return list({id(t): t for t in targets}.values())


def _insert_spec(tensor: gs.Tensor, after: str) -> tuple[int, np.dtype, int]:
    """(channels, dtype, rank) of a tensor a block can follow, or a UsageError naming it."""
    where = f"pass depth: option after={after!r}: tensor {tensor.name!r}"
    if isinstance(tensor, gs.Constant) or not tensor.inputs:
        raise UsageError(f"{where} is not produced by a node (a graph input or a constant)")
    if tensor.inputs[0].op == "Constant":
        raise UsageError(f"{where} is a constant, not an activation")
    shape = tensor.shape
    if shape is None or len(shape) not in (3, 4):
        rank = "unknown" if shape is None else f"{len(shape)}-D {list(shape)}"
        raise UsageError(f"{where} has shape {rank}; a block goes after a 4-D [N, C, H, W] or 3-D [N, C, T] tensor")
    dtype = np.dtype(tensor.dtype) if tensor.dtype is not None else None
    if dtype not in [np.dtype(d) for d in _FLOAT_DTYPES]:
        raise UsageError(f"{where} has element type {dtype}; a block needs float16, float32 or float64")
    if not isinstance(shape[1], int) or shape[1] < 1:
        raise UsageError(f"{where} has no static channel count (shape {list(shape)})")
    return shape[1], dtype, len(shape)


def _insert_block(view: GraphView, x: gs.Tensor, prefix: str, channels: int, width: int, spatial: int,
                  dtype: np.dtype, rng: np.random.Generator) -> tuple[gs.Tensor, list[gs.Node]]:
    """Put `y = x + BN2(Conv2(ReLU(BN1(Conv1(x)))))` between x and its readers; returns (y, the new nodes)."""
    kernel = (3,) * spatial
    conv_attrs = {"kernel_shape": list(kernel), "pads": [1] * (2 * spatial), "strides": [1] * spatial}

    def constant(name: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(f"{prefix}/{name}", np.ascontiguousarray(values.astype(dtype)))

    def he_normal(cout: int, cin: int) -> np.ndarray:
        return rng.standard_normal((cout, cin, *kernel)) * math.sqrt(2.0 / (cin * math.prod(kernel)))

    def batchnorm(name: str, size: int, scale: float) -> list[gs.Constant]:
        return [constant(f"{name}/scale", np.full(size, scale)), constant(f"{name}/bias", np.zeros(size)),
                constant(f"{name}/mean", np.zeros(size)), constant(f"{name}/var", np.ones(size))]

    readers = list(x.outputs)
    was_output = x in view.graph.outputs
    names = ["conv1", "bn1", "relu", "conv2", "bn2", "add"]
    tensors = [gs.Variable(f"{prefix}/{n}_out", dtype=dtype) for n in names]
    inputs = [
        [x, constant("conv1/weight", he_normal(width, channels))],
        [tensors[0], *batchnorm("bn1", width, 1.0)],
        [tensors[1]],
        [tensors[2], constant("conv2/weight", he_normal(channels, width))],
        [tensors[3], *batchnorm("bn2", channels, 0.0)],
        [x, tensors[4]],
    ]
    ops = ["Conv", "BatchNormalization", "Relu", "Conv", "BatchNormalization", "Add"]
    nodes = [gs.Node(op, name=f"{prefix}/{n}", attrs=dict(conv_attrs) if op == "Conv" else {}, inputs=i, outputs=[o])
             for op, n, i, o in zip(ops, names, inputs, tensors, strict=True)]
    y = tensors[-1]
    y.shape = list(x.shape)
    for reader in readers:
        _replace_input(reader, x, y)
    if was_output:  # the graph output keeps its name and now carries the block's result
        view.graph.outputs[view.graph.outputs.index(x)] = y
        x.name, y.name = f"{prefix}/input", x.name
    view.graph.nodes.extend(nodes)
    return y, nodes


# --- remove helpers -----------------------------------------------------------------------------------------

def _block_row(block: ResidualBlock, layers: list[dict]) -> dict:
    """The report row of one block: its Add, skip, branch nodes and the params and MACs the branch holds."""
    inside = {id(n) for n in block.nodes}
    private = {t.name: t for n in block.nodes for t in n.inputs
               if isinstance(t, gs.Constant) and all(id(c) in inside for c in t.outputs)}
    labels = {node_label(n) for n in block.nodes}
    macs = sum(r["macs"] or 0 for r in layers if r["node"] in labels)
    return {
        "block": block.name,
        "skip": block.skip,
        "branch_output": block.branch_output,
        "branch_nodes": [node_label(n) for n in block.nodes],
        "params": int(sum(t.values.size for t in private.values())),
        "macs": int(macs),
    }


def _importance(model: onnx.ModelProto, blocks: list[ResidualBlock], ctx: PassContext) -> list[float]:
    """RMS(f(x)) / RMS(x) per block over the calibration batch (seeded random inputs outside a pipeline)."""
    feeds = ctx.calibration if ctx.calibration is not None else random_inputs(model, batch=4, seed=ctx.seed)
    if ctx.calibration_is_random:
        ctx.warn("depth: block importance measured on random inputs; pass real data with --calibration")
    inputs = {i.name for i in model.graph.input}
    probes = [name for b in blocks for name in (b.skip, b.branch_output) if name not in inputs]
    values = {**feeds, **ProbeSession(model, probes).run(feeds)}
    ratios = []
    for block in blocks:
        skip_rms = _rms(values[block.skip])
        branch_rms = _rms(values[block.branch_output])
        ratios.append(branch_rms / skip_rms if skip_rms > 0 else (0.0 if branch_rms == 0 else math.inf))
    return [round(r, 6) for r in ratios]


def _rms(array: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(array.astype(np.float64))))) if array.size else 0.0


def _outermost(blocks: list[ResidualBlock], chosen: list[int]) -> list[int]:
    """Drop chosen blocks nested inside another chosen block's branch: they go with it."""
    inner = {id(n) for i in chosen for n in blocks[i].nodes}
    return [i for i in chosen if id(blocks[i].add) not in inner]


def _remove_block(view: GraphView, block: ResidualBlock) -> None:
    """`x + f(x)` -> x: the Add's readers read x (an Identity keeps a graph output's name); the branch is cut loose."""
    add = block.add
    skip, result = add.inputs[1 - block.branch_index], add.outputs[0]
    is_output = result in view.graph.outputs
    add.inputs.clear()
    add.outputs.clear()
    for node in block.nodes:
        node.inputs.clear()
        node.outputs.clear()
    if is_output:
        view.graph.nodes.append(gs.Node("Identity", name=f"{node_label(add)}/depth_identity", inputs=[skip],
                                        outputs=[result]))
    else:
        for reader in list(result.outputs):
            _replace_input(reader, result, skip)


def _append_metadata(model: onnx.ModelProto, entries: list[dict]) -> None:
    set_metadata(model, METADATA_KEY, json.dumps(json.loads(metadata_value(model, METADATA_KEY) or "[]") + entries))


def _replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for index, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[index] = new
