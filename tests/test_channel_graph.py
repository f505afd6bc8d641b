"""The channel-dependency analysis (passes/graph) on hand-written graphs: groups, ties, blocks, exact removal."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from channel_graphs import GraphBuilder, io_shapes, relative_change, run
from onnx import numpy_helper

from passes import PassContext
from passes.graph import analyze, handler_for, register_handler, supported_ops
from passes.graph.handler import Handler
from passes.graph.handlers import _TABLE, UNSUPPORTED
from passes.graph.ops_elementwise import GroupNormHandler, GroupNormHandler_21, UnaryHandler
from passes.structured_sparse import StructuredSparse

FEEDS = {"input": np.random.default_rng(7).standard_normal((1, 3, 8, 8)).astype(np.float32)}


def prune(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, dict, PassContext]:
    ctx = PassContext()
    new, details = StructuredSparse(StructuredSparse.Options(**options)).run(model, ctx)
    onnx.checker.check_model(new, full_check=True)
    assert io_shapes(new) == io_shapes(model)
    return new, details, ctx


def initializer(model: onnx.ModelProto, node_name: str, index: int) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[index]))


def group_named(details: dict, name: str) -> dict:
    return next(g for g in details["groups"] if g["name"] == name)


def test_chain_members_and_expected_weights():
    b = GraphBuilder((1, 3, 8, 8))
    w1, b1, w2 = b.weight(4, 3, 3, 3), b.weight(4), b.weight(5, 4, 3, 3)
    w1[2], b1[2] = 0, 0
    h = b.op("Relu", [b.conv("input", 3, 4, weight=w1, bias=b1, name="conv1")], name="relu")
    y = b.conv(h, 4, 5, weight=w2, name="conv2")
    model = b.model([y])

    analysis = analyze(model)
    conv1, conv2 = analysis.groups
    assert (conv1.name, conv1.channels, conv1.prunable.all()) == ("conv1", 4, True)
    assert [(m.node, m.role) for m in conv1.members] == [("conv1", "produces"), ("relu", "passes"),
                                                         ("conv2", "consumes")]
    assert not conv2.prunable.any() and "graph output" in str(conv2.reasons()[0])

    new, details, _ = prune(model, criterion="zero")
    np.testing.assert_array_equal(initializer(new, "conv1", 1), w1[[0, 1, 3]])
    np.testing.assert_array_equal(initializer(new, "conv1", 2), b1[[0, 1, 3]])
    np.testing.assert_array_equal(initializer(new, "conv2", 1), w2[:, [0, 1, 3]])
    entry = group_named(details, "conv1")
    assert (entry["status"], entry["kept"], entry["exact"]) == ("pruned", [0, 1, 3], True)
    assert relative_change(run(model, FEEDS), run(new, FEEDS)) <= 1e-6


def test_residual_add_needs_both_branches_zero():
    def build(zero_b: bool) -> onnx.ModelProto:
        b = GraphBuilder((1, 3, 8, 8))
        wa, wb = b.weight(4, 3, 3, 3), b.weight(4, 3, 3, 3)
        wa[1] = 0
        if zero_b:
            wb[1] = 0
        zeros = np.zeros(4, np.float32)
        added = b.op("Add", [b.conv("input", 3, 4, weight=wa, bias=zeros, name="a"),
                             b.conv("input", 3, 4, weight=wb, bias=zeros, name="b")])
        return b.model([b.conv(b.op("Relu", [added]), 4, 2, k=1)])

    group = analyze(build(False)).groups[0]
    assert group.producers == ["a", "b"] and group.channels == 4
    _, details, _ = prune(build(False), criterion="zero")
    assert details["summary"]["channels_before"] == details["summary"]["channels_after"]
    model = build(True)
    new, details, _ = prune(model, criterion="zero")
    assert group_named(details, "a")["kept"] == [0, 2, 3]
    assert initializer(new, "a", 1).shape == initializer(new, "b", 1).shape == (3, 3, 3, 3)
    assert relative_change(run(model, FEEDS), run(new, FEEDS)) <= 1e-6


def test_concat_maps_consumer_columns_by_offset():
    b = GraphBuilder((1, 3, 8, 8))
    wa, ba, wb, bb = b.weight(4, 3, 3, 3), b.weight(4), b.weight(3, 3, 3, 3), b.weight(3)
    wa[1], ba[1], wb[0], bb[0] = 0, 0, 0, 0
    wc = b.weight(2, 7, 1, 1)
    joined = b.op("Concat", [b.conv("input", 3, 4, weight=wa, bias=ba, name="a"),
                             b.conv("input", 3, 3, weight=wb, bias=bb, name="b")], axis=1)
    model = b.model([b.conv(b.op("Relu", [joined]), 7, 2, k=1, weight=wc, name="c")])
    new, details, _ = prune(model, criterion="zero")
    np.testing.assert_array_equal(initializer(new, "c", 1), wc[:, [0, 2, 3, 5, 6]])
    assert (group_named(details, "a")["kept"], group_named(details, "b")["kept"]) == ([0, 2, 3], [1, 2])
    assert relative_change(run(model, FEEDS), run(new, FEEDS)) <= 1e-6


def shuffle_model(zero_rows: dict[str, list[int]]) -> onnx.ModelProto:
    """Two convs -> Concat -> channel shuffle (Reshape, Transpose, Reshape) -> 1x1 conv."""
    b = GraphBuilder((1, 3, 8, 8))
    branches = []
    for name in ("a", "b"):
        w, bias = b.weight(4, 3, 3, 3), b.weight(4)
        w[zero_rows.get(name, [])], bias[zero_rows.get(name, [])] = 0, 0
        branches.append(b.conv("input", 3, 4, weight=w, bias=bias, name=name))
    grid = b.op("Reshape", [b.op("Concat", branches, axis=1), b.const(np.array([1, 2, 4, 8, 8]))])
    moved = b.op("Transpose", [grid], perm=[0, 2, 1, 3, 4])
    shuffled = b.op("Reshape", [moved, b.const(np.array([1, 8, 8, 8]))], name="unshuffle")
    return b.model([b.conv(b.op("Relu", [shuffled]), 8, 2, k=1, name="c")])


def test_channel_shuffle_ties_matching_channels_of_both_branches():
    group = analyze(shuffle_model({})).groups[0]
    assert group.producers == ["a", "b"] and group.channels == 4  # unit j = {a_j, b_j}
    _, details, _ = prune(shuffle_model({"a": [1]}), criterion="zero")
    assert details["summary"]["channels_after"] == details["summary"]["channels_before"]
    model = shuffle_model({"a": [1], "b": [1]})
    new, details, _ = prune(model, criterion="zero")
    assert group_named(details, "a")["kept"] == [0, 2, 3]
    unshuffle = next(n for n in new.graph.node if n.name == "unshuffle")
    target = next(t for t in new.graph.initializer if t.name == unshuffle.input[1])
    assert numpy_helper.to_array(target).tolist() == [1, 6, 8, 8]
    assert initializer(new, "c", 1).shape == (2, 6, 1, 1)
    assert relative_change(run(model, FEEDS), run(new, FEEDS)) <= 1e-6


def grouped_model(zero_group: int | None) -> onnx.ModelProto:
    """conv (3->8) -> Relu -> grouped conv (8->8, 4 groups of 2) -> Relu -> 1x1 conv."""
    b = GraphBuilder((1, 3, 8, 8))
    w1, b1, wg, bg = b.weight(8, 3, 3, 3), b.weight(8), b.weight(8, 2, 3, 3), b.weight(8)
    if zero_group is not None:
        rows = [2 * zero_group, 2 * zero_group + 1]
        w1[rows], b1[rows], wg[rows], bg[rows] = 0, 0, 0, 0
    h = b.op("Relu", [b.conv("input", 3, 8, weight=w1, bias=b1, name="conv1")])
    h = b.op("Relu", [b.conv(h, 8, 8, group=4, weight=wg, bias=bg, name="grouped")])
    return b.model([b.conv(h, 8, 2, k=1, name="out")])


def test_grouped_conv_is_pruned_in_whole_groups():
    group = analyze(grouped_model(None)).groups[0]
    assert group.producers == ["conv1", "grouped"] and group.channels == 4
    model = grouped_model(1)
    new, details, _ = prune(model, criterion="zero")
    grouped = next(n for n in new.graph.node if n.name == "grouped")
    assert onnx.helper.get_attribute_value(next(a for a in grouped.attribute if a.name == "group")) == 3
    assert initializer(new, "grouped", 1).shape == (6, 2, 3, 3)
    assert relative_change(run(model, FEEDS), run(new, FEEDS)) <= 1e-6
    half, details, _ = prune(grouped_model(None), ratio=0.5)
    assert initializer(half, "grouped", 1).shape == (4, 2, 3, 3)
    run(half, FEEDS)


def test_unsupported_op_declines_with_a_reason_and_leaves_the_model_alone():
    b = GraphBuilder((1, 3, 8, 8))
    h = b.op("LRN", [b.conv("input", 3, 4, name="conv1")], size=3)
    model = b.model([b.conv(h, 4, 2, name="conv2")])
    new, details, ctx = prune(model, ratio=0.5)
    assert "LRN is not supported" in group_named(details, "conv1")["reason"]
    assert group_named(details, "conv1")["status"] == "declined"
    assert details["message"].startswith("no prunable channel group") and ctx.warnings
    assert new.SerializeToString() == model.SerializeToString()


def constant_channel_model(consumer_kernel: int) -> onnx.ModelProto:
    """conv1 channel 2 has zero weights but bias 0.7, so after Relu it is the constant 0.7 everywhere."""
    b = GraphBuilder((1, 3, 8, 8))
    w1, b1 = b.weight(4, 3, 3, 3), b.weight(4)
    w1[2], b1[2] = 0, 0.7
    h = b.op("Relu", [b.conv("input", 3, 4, weight=w1, bias=b1, name="conv1")])
    return b.model([b.conv(h, 4, 3, k=consumer_kernel, name="conv2")])


def test_constant_channel_folds_exactly_into_an_unpadded_consumer():
    model = constant_channel_model(1)
    new, details, _ = prune(model, criterion="zero")
    w2, b2 = initializer(model, "conv2", 1), initializer(model, "conv2", 2)
    np.testing.assert_allclose(initializer(new, "conv2", 2), b2 + 0.7 * w2[:, 2, 0, 0], rtol=1e-6)
    assert group_named(details, "conv1")["kept"] == [0, 1, 3]
    assert relative_change(run(model, FEEDS), run(new, FEEDS)) <= 1e-6


def test_constant_channel_is_kept_before_a_zero_padded_consumer():
    model = constant_channel_model(3)
    _, details, _ = prune(model, criterion="zero")
    assert group_named(details, "conv1")["channels_after"] == 4
    assert "without changing the outputs" in group_named(details, "conv1")["reason"]
    new, details, _ = prune(model, ratio=0.25)
    assert any("zero-padded border" in note for note in group_named(details, "conv1")["notes"])


def test_batchnorm_with_zero_scale_leaves_only_its_bias():
    b = GraphBuilder((1, 3, 8, 8))
    scale, bias = np.array([1.0, 0.0, 0.8, 1.2], np.float32), np.array([0.1, 0.3, -0.2, 0.0], np.float32)
    h = b.op("Relu", [b.conv("input", 3, 4, name="conv1")])
    mean, var = np.full(4, 0.1, np.float32), np.full(4, 0.9, np.float32)
    h = b.op("BatchNormalization", [h, b.const(scale), b.const(bias), b.const(mean), b.const(var)], name="bn")
    model = b.model([b.conv(h, 4, 2, k=1, name="conv2")])
    new, details, _ = prune(model, criterion="zero")
    assert group_named(details, "conv1")["kept"] == [0, 2, 3]
    assert initializer(new, "bn", 1).tolist() == pytest.approx([1.0, 0.8, 1.2])
    assert relative_change(run(model, FEEDS), run(new, FEEDS)) <= 1e-6


def test_flatten_gemm_fold_respects_trans_b_alpha_and_beta():
    b = GraphBuilder((1, 3, 4, 4))
    w1, b1 = b.weight(4, 3, 3, 3), b.weight(4)
    w1[3], b1[3] = 0, 0.4
    flat = b.op("Flatten", [b.op("Relu", [b.conv("input", 3, 4, weight=w1, bias=b1, name="conv1")])])
    y = b.op("Gemm", [flat, b.const(b.weight(2, 64)), b.const(b.weight(2))], name="fc", transB=1, alpha=0.5,
             beta=2.0)
    model = b.model([y])
    feeds = {"input": FEEDS["input"][:, :, :4, :4].copy()}
    new, details, _ = prune(model, criterion="zero")
    assert initializer(new, "fc", 1).shape == (2, 48)
    assert group_named(details, "conv1")["kept"] == [0, 1, 2]
    assert relative_change(run(model, feeds), run(new, feeds)) <= 1e-6


def test_matmul_without_bias_gets_one_for_a_folded_constant():
    b = GraphBuilder((1, 5, 6))
    w1, b1 = b.weight(6, 4), b.weight(4)
    w1[:, 2], b1[2] = 0, 0.5
    hidden = b.op("Relu", [b.op("Add", [b.op("MatMul", ["input", b.const(w1)], name="fc1"), b.const(b1)])])
    model = b.model([b.op("MatMul", [hidden, b.const(b.weight(4, 3))], name="fc2")])
    feeds = {"input": np.random.default_rng(3).standard_normal((1, 5, 6)).astype(np.float32)}
    new, details, _ = prune(model, criterion="zero")
    assert group_named(details, "fc1")["kept"] == [0, 1, 3]
    assert [n.op_type for n in new.graph.node].count("Add") == 2
    assert relative_change(run(model, feeds), run(new, feeds)) <= 1e-6


def test_split_sizes_follow_the_pruned_channels():
    b = GraphBuilder((1, 3, 8, 8))
    w1, b1 = b.weight(8, 3, 3, 3), b.weight(8)
    w1[[5, 6]], b1[[5, 6]] = 0, 0
    left, right = b.op("Split", [b.op("Relu", [b.conv("input", 3, 8, weight=w1, bias=b1, name="conv1")]),
                                 b.const(np.array([4, 4]))], outputs=2, axis=1, name="split")
    model = b.model([b.op("Add", [b.conv(left, 4, 2, k=1), b.conv(right, 4, 2, k=1)])])
    new, _, _ = prune(model, criterion="zero")
    assert initializer(new, "split", 1).tolist() == [4, 2]
    assert relative_change(run(model, FEEDS), run(new, FEEDS)) <= 1e-6


def test_channels_a_slice_drops_are_dead_and_removed_exactly():
    b = GraphBuilder((1, 3, 8, 8))
    h = b.op("Relu", [b.conv("input", 3, 8, name="conv1")])
    cut = b.op("Slice", [h, b.const(np.array([2])), b.const(np.array([7])), b.const(np.array([1]))], name="slice")
    model = b.model([b.conv(cut, 5, 2, k=1)])
    new, details, _ = prune(model, criterion="zero")
    assert group_named(details, "conv1")["kept"] == [2, 3, 4, 5, 6]
    assert (initializer(new, "slice", 1).tolist(), initializer(new, "slice", 2).tolist()) == ([0], [5])
    assert relative_change(run(model, FEEDS), run(new, FEEDS)) <= 1e-6


def test_layernorm_over_channels_is_declined():
    b = GraphBuilder((1, 5, 6))
    h = b.op("MatMul", ["input", b.const(b.weight(6, 4))], name="fc1")
    h = b.op("LayerNormalization", [h, b.const(np.ones(4, np.float32)), b.const(np.zeros(4, np.float32))], axis=-1)
    model = b.model([b.op("MatMul", [h, b.const(b.weight(4, 3))])])
    group = analyze(model).groups[0]
    assert not group.prunable.any() and "normalizes over the channel axis" in str(group.reasons()[0])


def test_channel_count_read_at_run_time_blocks_the_group():
    b = GraphBuilder((1, 3, 8, 8))
    h = b.op("Relu", [b.conv("input", 3, 4, name="conv1")])
    count = b.op("Cast", [b.op("Gather", [b.op("Shape", [h]), b.const(np.array(1))], axis=0)], to=1)
    model = b.model([b.op("Mul", [b.conv(h, 4, 2, name="conv2"), count])])
    group = next(g for g in analyze(model).groups if g.name == "conv1")
    assert "channel count it reads" in str(group.reasons()[0])


def test_a_flatten_that_slices_only_the_batch_from_the_shape_leaves_the_group_prunable():
    """Shape -> Cast -> Slice [0:1] -> Concat [-1] -> Reshape (a flatten with a dynamic batch) reads the batch,
    not the channel count; the Gemm after it is an ordinary consumer and pruning equals the zeroed twin."""
    b = GraphBuilder(("n", 3, 4, 4))
    w = b.weight(6, 3, 3, 3)
    w[[1, 4]] = 0  # two silent filters (no bias): exactly removable
    h = b.op("Relu", [b.conv("input", 3, 6, weight=w, use_bias=False, name="conv1")])
    batch = b.op("Slice", [b.op("Cast", [b.op("Shape", [h])], to=7), b.const(np.array([0])), b.const(np.array([1])),
                           b.const(np.array([0]))])
    flat = b.op("Reshape", [h, b.op("Concat", [batch, b.const(np.array([-1]))], axis=0)])
    model = b.model([b.op("Gemm", [flat, b.const(b.weight(96, 5)), b.const(b.weight(5))])], [("n", 5)])
    group = next(g for g in analyze(model).groups if g.name == "conv1")
    assert group.prunable.all()
    new, details, _ = prune(model, criterion="zero")
    assert group_named(details, "conv1")["channels_after"] == 4
    feeds = {"input": np.random.default_rng(1).standard_normal((3, 3, 4, 4)).astype(np.float32)}
    assert relative_change(run(model, feeds), run(new, feeds)) < 1e-6


def test_residual_with_a_graph_input_blocks_the_group():
    b = GraphBuilder((1, 3, 8, 8))
    h = b.op("Relu", [b.op("Add", ["input", b.conv("input", 3, 3, name="conv1")])])
    model = b.model([b.conv(h, 3, 2, name="conv2")])
    group = next(g for g in analyze(model).groups if g.name == "conv1")
    assert "no prunable origin" in str(group.reasons()[0])


def test_handler_table_is_checked_at_registration():
    assert all(onnx.defs.has(op) for op in supported_ops())
    assert {"Conv", "Gemm", "MatMul", "Concat", "Reshape", "BatchNormalization", "ReduceMean"} <= set(supported_ops())

    class Nothing(Handler):
        op_types = ("Relu",)

    class Fake(UnaryHandler):
        op_types = ("NotAnOnnxOp",)

    with pytest.raises(TypeError):
        register_handler(Nothing())
    with pytest.raises(ValueError, match="not an ONNX operator"):
        register_handler(Fake())
    with pytest.raises(ValueError, match="already has a handler"):
        register_handler(UnaryHandler())
    with pytest.raises(TypeError):
        register_handler(object())


def test_opset_variants_and_foreign_domains():
    node = gs.Node("GroupNormalization", attrs={"num_groups": 2})
    assert isinstance(handler_for(node, 18), GroupNormHandler) and not isinstance(handler_for(node, 18),
                                                                                  GroupNormHandler_21)
    assert isinstance(handler_for(node, 21), GroupNormHandler_21)
    assert handler_for(node, 17) is UNSUPPORTED
    assert handler_for(gs.Node("Conv", domain="com.microsoft"), 17) is UNSUPPORTED


def test_a_registered_handler_extends_the_analysis():
    b = GraphBuilder((1, 3, 8, 8))
    h = b.op("Shrink", [b.conv("input", 3, 4, name="conv1")], lambd=0.1)
    model = b.model([b.conv(h, 4, 2, name="conv2")])
    assert not analyze(model).groups[0].prunable.any()

    class ShrinkHandler(UnaryHandler):
        op_types = ("Shrink",)

    register_handler(ShrinkHandler())
    try:
        assert analyze(model).groups[0].prunable.all()
    finally:
        del _TABLE["Shrink"]


def test_group_norm_prelu_gelu_and_resize_carry_channels_exactly():
    """A dead GroupNormalization group normalizes to constants, which PRelu, an Erf-based GELU and Resize keep
    constant, and the unpadded consumer folds them."""
    b = GraphBuilder((1, 3, 8, 8), opset=21)
    w1, b1 = b.weight(8, 3, 3, 3), b.weight(8)
    w1[[2, 3]] = 0
    h = b.conv("input", 3, 8, weight=w1, bias=b1, name="conv1")
    h = b.op("GroupNormalization", [h, b.const(b.weight(8) + 1), b.const(b.weight(8))], num_groups=4, name="gn")
    h = b.op("PRelu", [h, b.const(np.full((8, 1, 1), 0.1, np.float32))])
    erf = b.op("Erf", [b.op("Div", [h, b.const(np.float32(np.sqrt(2)))])])
    h = b.op("Mul", [b.op("Mul", [h, b.const(np.float32(0.5))]), b.op("Add", [erf, b.const(np.float32(1))])])
    h = b.op("Resize", [h, "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    model = b.model([b.conv(h, 8, 2, k=1, name="conv2")], shapes=[(1, 2, 16, 16)])
    new, details, _ = prune(model, criterion="zero")
    assert group_named(details, "conv1")["kept"] == [0, 2, 3]  # units are the 4 groups of 2 channels
    gn = next(n for n in new.graph.node if n.name == "gn")
    assert onnx.helper.get_attribute_value(next(a for a in gn.attribute if a.name == "num_groups")) == 3
    assert initializer(new, "conv2", 1).shape == (2, 6, 1, 1)
    assert relative_change(run(model, FEEDS), run(new, FEEDS)) <= 1e-5


def test_dynamic_batch_reshape_gets_its_concat_target_updated():
    """Channel shuffle whose target is Concat(batch read from Shape, constants), as dynamic-batch exports write."""
    b = GraphBuilder(("N", 3, 8, 8))
    w, bias = b.weight(8, 3, 3, 3), b.weight(8)
    w[[1, 5]], bias[[1, 5]] = 0, 0
    h = b.conv("input", 3, 8, weight=w, bias=bias, name="conv1")
    batch = b.op("Gather", [b.op("Shape", ["input"]), b.const(np.array([0]))], axis=0)
    target = b.op("Concat", [batch, *(b.const(np.array([v])) for v in (2, 4, 8, 8))], axis=0, name="target")
    moved = b.op("Transpose", [b.op("Reshape", [h, target], name="grid")], perm=[0, 2, 1, 3, 4])
    flat = b.op("Reshape", [moved, b.op("Concat", [batch, b.const(np.array([8, 8, 8]))], axis=0)], name="flat")
    # a target may also join a multi-element constant
    model = b.model([b.conv(b.op("Relu", [flat]), 8, 2, k=1, name="conv2")])
    feeds = {"input": np.random.default_rng(5).standard_normal((3, 3, 8, 8)).astype(np.float32)}
    new, details, _ = prune(model, criterion="zero")
    assert group_named(details, "conv1")["kept"] == [0, 2, 3]  # unit j = channels j and 4 + j
    grid = next(n for n in new.graph.node if n.name == "grid")
    target = next(n for n in new.graph.node if n.output[0] == grid.input[1])
    pieces = [numpy_helper.to_array(next(t for t in new.graph.initializer if t.name == i)).tolist()
              for i in target.input[1:]]
    assert pieces == [[2], [3], [8], [8]]
    assert relative_change(run(model, feeds), run(new, feeds)) <= 1e-6
