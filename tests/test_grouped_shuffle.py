"""ShuffleNet v1 blocks: grouped 1x1 convs around a channel shuffle and a depthwise conv are pruned channel by
channel (every group loses the same positions, the shuffle keeps a valid reshape), exactly: the pruned model
computes what the original computes with the removed channels zeroed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from channel_graphs import GraphBuilder, io_shapes, relative_change, run
from onnx import helper, numpy_helper

from passes import PassContext
from passes.graph import analyze
from passes.graph.prune import RemovalCut
from passes.structured_sparse import StructuredSparse, count_params, prepare

GROUPS, TRUNK, MID, SIDE = 2, 8, 12, 8
FEEDS = {"input": np.random.default_rng(3).standard_normal((1, 3, SIDE, SIDE)).astype(np.float32)}
TOLERANCE = 1e-5  # float32 sums in another order: removed channels are exact zeros in the twin


def _shuffle(b: GraphBuilder, x: str, channels: int, side: int, tag: str) -> str:
    grid = b.op("Reshape", [x, b.const(np.array([1, GROUPS, channels // GROUPS, side, side]))], name=f"{tag}_grid")
    moved = b.op("Transpose", [grid], perm=[0, 2, 1, 3, 4])
    return b.op("Reshape", [moved, b.const(np.array([1, channels, side, side]))], name=f"{tag}_flat")


def _unit(b: GraphBuilder, x: str, tag: str, stride: int, zero: dict[str, list[int]]) -> str:
    """grouped 1x1 conv -> Relu -> channel shuffle -> depthwise 3x3 -> grouped 1x1 conv (ShuffleNet v1)."""
    weights = {}
    for name, shape in ((f"{tag}_g1", (MID, TRUNK // GROUPS, 1, 1)), (f"{tag}_g2", (TRUNK, MID // GROUPS, 1, 1))):
        w, bias = b.weight(*shape), b.weight(shape[0])
        w[zero.get(name, [])], bias[zero.get(name, [])] = 0, 0
        weights[name] = (w, bias)
    h = b.op("Relu", [b.conv(x, TRUNK, MID, k=1, group=GROUPS, weight=weights[f"{tag}_g1"][0],
                             bias=weights[f"{tag}_g1"][1], name=f"{tag}_g1")])
    h = _shuffle(b, h, MID, SIDE, tag)
    h = b.conv(h, MID, MID, k=3, group=MID, strides=stride, name=f"{tag}_dw")
    return b.conv(h, MID, TRUNK, k=1, group=GROUPS, weight=weights[f"{tag}_g2"][0], bias=weights[f"{tag}_g2"][1],
                  name=f"{tag}_g2")


def shufflenet_block(zero: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """stem conv -> unit with a residual Add -> unit with stride 2 concatenated with an AveragePool of its input
    (ShuffleNet v1's downsampling unit) -> GlobalAveragePool -> Gemm. `zero`: producer rows to zero (with bias)."""
    zero = zero or {}
    b = GraphBuilder((1, 3, SIDE, SIDE), seed=1)
    w, bias = b.weight(TRUNK, 3, 3, 3), b.weight(TRUNK)
    w[zero.get("stem", [])], bias[zero.get("stem", [])] = 0, 0
    x = b.op("Relu", [b.conv("input", 3, TRUNK, weight=w, bias=bias, name="stem")])
    y = b.op("Relu", [b.op("Add", [_unit(b, x, "u1", 1, zero), x], name="residual")])
    pooled = b.op("AveragePool", [y], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    joined = b.op("Relu", [b.op("Concat", [_unit(b, y, "u2", 2, zero), pooled], axis=1, name="join")])
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [joined])])
    return b.model([b.op("Gemm", [flat, b.const(b.weight(3, 2 * TRUNK)), b.const(b.weight(3))], transB=1)])


def _prune(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, dict]:
    new, details = StructuredSparse(StructuredSparse.Options(**options)).run(model, PassContext())
    onnx.checker.check_model(new, full_check=True)
    assert io_shapes(new) == io_shapes(model)
    return new, details


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _group_attr(model: onnx.ModelProto, name: str) -> int:
    return helper.get_attribute_value(next(a for a in _node(model, name).attribute if a.name == "group"))


def _group_of(details: dict, producer: str) -> dict:
    return next(g for g in details["groups"] if producer in g["producers"])


def _zeroed_twin(model: onnx.ModelProto, details: dict) -> onnx.ModelProto:
    """The model with every channel the pass removed zeroed at each of its producers (weight rows and bias)."""
    analysis = analyze(prepare(model))
    removed = {int(r) for entry in details["groups"] if entry["status"] == "pruned"
               for i, r in enumerate(analysis.groups[entry["id"]].roots) if i not in entry["kept"]}
    cut = RemovalCut(analysis, removed)
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    initializers = {t.name: t for t in twin.graph.initializer}
    for slices in analysis.state.producers:
        keep = cut.keep_named(slices.tensor)
        node = _node(twin, slices.node)
        if keep is None or node.op_type != "Conv":
            continue
        for name in node.input[1:]:
            values = numpy_helper.to_array(initializers[name]).copy()
            values[~keep] = 0
            initializers[name].CopyFrom(numpy_helper.from_array(values, name))
    return twin


def test_grouped_convs_around_a_shuffle_are_pruned_by_aligned_positions():
    analysis = analyze(shufflenet_block())
    groups = {tuple(g.producers): g for g in analysis.groups}
    # u1_g1's output local j of both groups + the depthwise channels it reaches; the shuffle and u1_g2's equal
    # group widths then tie j with j + 3: 3 units of 4 channels
    mid = groups[("u1_g1", "u1_dw")]
    assert mid.channels == 3 and mid.prunable.all()
    # trunk: stem, u1_g2 (residual) -> 4 units {l, l + 4} (one position of both groups of u1_g1 and u2_g1)
    trunk = groups[("stem", "u1_g2")]
    assert trunk.channels == TRUNK // GROUPS and trunk.prunable.all()
    roles = {(m.node, m.role) for m in trunk.members}
    assert {("u1_g1", "consumes"), ("u2_g1", "consumes"), ("residual", "passes")} <= roles


def test_zeroed_channels_are_removed_exactly_and_the_shuffle_stays_consistent():
    # unit {j=1, j=4} of u1: u1_g1 rows j and 6 + j; the depthwise bias stays, so that constant folds into u1_g2
    zero = {"u1_g1": [1, 4, 7, 10], "stem": [2, 6], "u1_g2": [2, 6]}
    model = shufflenet_block(zero)
    new, details = _prune(model, criterion="zero")
    assert _group_of(details, "u1_g1")["kept"] == [0, 2] and _group_of(details, "stem")["kept"] == [0, 1, 3]
    assert all(g["exact"] for g in details["groups"] if g["status"] == "pruned")
    assert _array(new, _node(new, "u1_grid").input[1]).tolist() == [1, 2, 4, SIDE, SIDE]
    assert _array(new, _node(new, "u1_flat").input[1]).tolist() == [1, 8, SIDE, SIDE]
    assert _array(new, _node(new, "u1_g1").input[1]).shape == (8, 3, 1, 1)
    assert (_array(new, _node(new, "u1_dw").input[1]).shape, _group_attr(new, "u1_dw")) == ((8, 1, 3, 3), 8)
    assert _array(new, _node(new, "u1_g2").input[1]).shape == (6, 4, 1, 1)
    assert _group_attr(new, "u1_g1") == _group_attr(new, "u1_g2") == GROUPS
    assert relative_change(run(model, FEEDS), run(new, FEEDS)) <= TOLERANCE


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_ratio_pruning_equals_the_zeroed_twin(ratio):
    model = shufflenet_block()
    new, details = _prune(model, ratio=ratio)
    assert count_params(new) < count_params(model)
    assert _group_attr(new, "u2_g1") == _group_attr(new, "u2_g2") == GROUPS
    for tag in ("u1", "u2"):
        grid = _array(new, _node(new, f"{tag}_grid").input[1]).tolist()
        flat = _array(new, _node(new, f"{tag}_flat").input[1]).tolist()
        width = _array(new, _node(new, f"{tag}_g1").input[1]).shape[0]
        assert grid[1:3] == [GROUPS, width // GROUPS] and flat[1] == width == _group_attr(new, f"{tag}_dw")
    assert relative_change(run(_zeroed_twin(model, details), FEEDS), run(new, FEEDS)) <= TOLERANCE


def _error(model: onnx.ModelProto, candidate: onnx.ModelProto, inputs: np.ndarray) -> float:
    """||candidate - model|| / ||model|| over the samples (fed one by one: the shuffle fixes batch 1)."""
    outputs = [np.concatenate([run(m, {"input": x[None]})[0] for x in inputs]) for m in (model, candidate)]
    return float(np.linalg.norm(outputs[1] - outputs[0]) / np.linalg.norm(outputs[0]))


def test_lsq_recovery_and_the_params_budget_follow_channel_by_channel_groups():
    model = shufflenet_block()
    rng = np.random.default_rng(5)
    calibration = {"input": rng.standard_normal((32, 3, SIDE, SIDE)).astype(np.float32)}
    held_out = rng.standard_normal((8, 3, SIDE, SIDE)).astype(np.float32)
    options = StructuredSparse.Options(ratio=0.5, criterion="l1", recover="lsq")
    recovered, details = StructuredSparse(options).run(model, PassContext(calibration=calibration))
    onnx.checker.check_model(recovered, full_check=True)
    assert {"u1_g1", "u1_g2", "u2_g1"} <= {layer["node"] for layer in details["recovery"]}
    plain, _ = _prune(model, ratio=0.5, criterion="l1")
    assert _error(model, recovered, held_out) < 0.5 * _error(model, plain, held_out)
    _, details = _prune(model, keep_params=0.6)
    budget = details["summary"]["budget"]
    assert abs(budget["estimated"] - budget["reached"]) <= 0.01 and budget["reached"] <= 0.62
