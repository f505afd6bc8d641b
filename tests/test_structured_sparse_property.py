"""Property: on random DAGs of supported ops with randomly zeroed channels, structured-sparse with criterion=zero
is exact or declines with a reason, never crashes and never writes an invalid model; ratio mode stays valid."""

from __future__ import annotations

import numpy as np
import onnx
from channel_graphs import GraphBuilder, io_shapes, relative_change, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from passes import PassContext
from passes.structured_sparse import StructuredSparse

SHAPE = (1, 3, 6, 6)
ACTIVATIONS = ["Relu", "Sigmoid", "LeakyRelu", "HardSwish", "Tanh", "Softplus"]
KINDS = ["conv", "conv", "act", "bn", "binary", "concat", "split", "pool", "scale", "shuffle", "slice", "unsupported",
         "padded_average", "pad_crop", "instance_norm", "deconv", "grouped", "reduce_add", "gather", "where"]


def _conv(b: GraphBuilder, data: st.DataObject, x: str, cin: int) -> tuple[str, int]:
    depthwise = cin > 1 and data.draw(st.booleans(), "depthwise")
    cout = cin if depthwise else data.draw(st.integers(2, 6), "cout")
    k = data.draw(st.sampled_from([1, 3]), "kernel")
    group = cin if depthwise else 1
    weight, bias = b.weight(cout, cin // group, k, k), b.weight(cout)
    dead = data.draw(st.lists(st.integers(0, cout - 1), max_size=cout, unique=True), "dead rows")
    weight[dead] = 0
    bias[dead] = 0 if data.draw(st.booleans(), "dead bias zero") else bias[dead]
    if not depthwise and data.draw(st.booleans(), "zero columns"):
        weight[:, data.draw(st.integers(0, cin - 1), "column")] = 0
    return b.conv(x, cin, cout, k=k, group=group, weight=weight, bias=bias), cout


def _step(b: GraphBuilder, data: st.DataObject, pool: list[tuple[str, int]]) -> tuple[str, int]:
    x, c = data.draw(st.sampled_from(pool), "operand")
    kind = data.draw(st.sampled_from(KINDS), "op")
    same = [t for t in pool if t[1] == c]
    if kind == "act":
        return b.op(data.draw(st.sampled_from(ACTIVATIONS), "activation"), [x]), c
    if kind == "bn":
        scale = b.weight(c)
        scale[data.draw(st.integers(0, c - 1), "zero gamma")] = 0
        params = [scale, b.weight(c), b.weight(c), np.abs(b.weight(c)) + 0.5]
        return b.op("BatchNormalization", [x, *(b.const(p) for p in params)]), c
    if kind == "binary":
        y, _ = data.draw(st.sampled_from(same), "other operand")
        return b.op(data.draw(st.sampled_from(["Add", "Mul", "Sub"]), "binary op"), [x, y]), c
    if kind == "concat":
        y, cy = data.draw(st.sampled_from(pool), "other operand")
        return b.op("Concat", [x, y], axis=1), c + cy
    if kind == "split" and c >= 2:
        first = data.draw(st.integers(1, c - 1), "split")
        left, right = b.op("Split", [x, b.const(np.array([first, c - first]))], outputs=2, axis=1)
        pool.append((left, first))
        return right, c - first
    if kind == "pool":
        return b.op("MaxPool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), c
    if kind == "scale":
        return b.op("Mul", [x, b.const(b.weight(c, 1, 1))]), c
    if kind == "shuffle" and c % 2 == 0:
        grid = b.op("Reshape", [x, b.const(np.array([1, 2, c // 2, 6, 6]))])
        moved = b.op("Transpose", [grid], perm=[0, 2, 1, 3, 4])
        return b.op("Reshape", [moved, b.const(np.array([1, c, 6, 6]))]), c
    if kind == "slice" and c >= 2:
        start = data.draw(st.integers(0, c - 2), "slice start")
        end = data.draw(st.integers(start + 1, c), "slice end")
        return b.op("Slice", [x, *(b.const(np.array([v])) for v in (start, end, 1))]), end - start
    if kind == "unsupported":
        return b.op("LRN", [x], size=3), c
    return _step_more(b, data, kind, x, c)


def _step_more(b: GraphBuilder, data: st.DataObject, kind: str, x: str, c: int) -> tuple[str, int]:
    if kind == "padded_average":
        return b.op("AveragePool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1), c
    if kind == "pad_crop":
        padded = b.op("Pad", [x, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]))])
        return b.op("Slice", [padded, *(b.const(np.array(v)) for v in ([1, 1], [7, 7], [2, 3]))]), c
    if kind == "instance_norm":
        return b.op("InstanceNormalization", [x, b.const(b.weight(c)), b.const(b.weight(c))]), c
    if kind == "deconv":
        weight = b.weight(c, 4, 3, 3)
        weight[:, data.draw(st.integers(0, 3), "zero deconv output")] = 0
        return b.op("ConvTranspose", [x, b.const(weight), b.const(b.weight(4))], kernel_shape=[3, 3],
                    pads=[1, 1, 1, 1]), 4
    if kind == "grouped" and c % 2 == 0:
        return b.conv(x, c, c, k=3, group=2), c
    if kind == "reduce_add":
        return b.op("Add", [x, b.op("ReduceMean", [x], axes=[3], keepdims=1)]), c
    if kind == "gather":
        return b.op("Gather", [x, b.const(np.arange(c)[::-1].copy())], axis=1), c
    if kind == "where":
        return b.op("Where", [b.op("Greater", [x, b.const(np.float32(0))]), x, b.const(np.float32(0.5))]), c
    return _conv(b, data, x, c)


def random_model(data: st.DataObject) -> onnx.ModelProto:
    b = GraphBuilder(SHAPE, seed=data.draw(st.integers(0, 2**16), "seed"))
    pool = [_conv(b, data, "input", 3)]
    for _ in range(data.draw(st.integers(2, 9), "depth")):
        pool.append(_step(b, data, pool))
    last, channels = pool[-1]
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [last])])
    return b.model([b.op("Gemm", [flat, b.const(b.weight(3, channels)), b.const(b.weight(3))], transB=1)])


def _prune(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, dict]:
    new, details = StructuredSparse(StructuredSparse.Options(**options)).run(model, PassContext())
    onnx.checker.check_model(new, full_check=True)
    assert io_shapes(new) == io_shapes(model)
    return new, details


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_graphs_are_pruned_exactly_or_declined_with_a_reason(data):
    model = random_model(data)
    feeds = {"input": np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)}
    reference = run(model, feeds)
    new, details = _prune(model, criterion="zero")
    assert relative_change(reference, run(new, feeds)) <= 1e-4
    for group in details["groups"]:
        if group["status"] == "pruned":
            assert group["exact"]
        else:
            assert group["channels_after"] == group["channels_before"] and group["reason"]
    halved, _ = _prune(model, ratio=0.5)
    assert [o.shape for o in run(halved, feeds)] == [o.shape for o in reference]
