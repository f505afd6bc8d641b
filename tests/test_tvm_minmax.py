"""ONNX Max/Min/Sum/Mean between convolutions on the tvm runtime, against ONNX Runtime at batch 1 and 2.

TVM's importer writes them as a reduce over `stack(...)`, on which ConvertLayout failed ("Invalid SLayout");
runtimes/tvm/legalize_minmax.py folds them pairwise instead."""

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import runtimes

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tvm") is None, reason="apache-tvm is not installed")

RELATIVE_TOLERANCE = 1e-5
CONV_NODES = {"conv1", "conv2", "conv3"}


def _weight(rng, name, *shape, scale=0.3):
    return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name)


def minmax_model() -> onnx.ModelProto:
    """x[N, 3, 6, 6] -> Conv -> Max(., Constant 0.0) -> two Convs a2, a3, then Min(a2, a3), a three-input Max with a
    per-channel [8, 1, 1] initializer, Sum(a2, a3) and Mean(a2, a3, a2)."""
    rng = np.random.default_rng(7)
    zero = numpy_helper.from_array(np.array(0.0, np.float32))
    nodes = [
        helper.make_node("Conv", ["x", "k1", "c1"], ["a1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Constant", [], ["zero"], value=zero),
        helper.make_node("Max", ["a1", "zero"], ["r1"], name="relu_as_max"),
        helper.make_node("Conv", ["r1", "k2", "c2"], ["a2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["r1", "k3"], ["a3"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Min", ["a2", "a3"], ["lower"], name="min_of_activations"),
        helper.make_node("Max", ["a2", "floor", "a3"], ["upper"], name="max_of_three"),
        helper.make_node("Sum", ["a2", "a3"], ["total"], name="sum_of_activations"),
        helper.make_node("Mean", ["a2", "a3", "a2"], ["average"], name="mean_of_three"),
    ]
    initializers = [
        _weight(rng, "k1", 8, 3, 3, 3),
        _weight(rng, "c1", 8),
        _weight(rng, "k2", 8, 8, 3, 3),
        _weight(rng, "c2", 8),
        _weight(rng, "k3", 8, 8, 3, 3),
        _weight(rng, "floor", 8, 1, 1),
    ]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 8, 6, 6])
               for name in ("lower", "upper", "total", "average")]  # fmt: skip
    graph = helper.make_graph(
        nodes, "minmax", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])], outputs, initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("batch", [1, 2])
def test_max_min_sum_mean_between_convs_match_ort(batch):
    model = minmax_model()
    feeds = {"x": np.random.default_rng(batch).standard_normal((batch, 3, 6, 6)).astype(np.float32)}
    session = runtimes.load("tvm", model, batch=batch, threads=1, cache=False)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    actual = session.run(feeds)
    assert list(actual) == ["lower", "upper", "total", "average"]
    for want, got in zip(expected, actual.values(), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert np.abs(got - want).max() <= RELATIVE_TOLERANCE * np.abs(want).max()
    facts = session.describe()
    assert facts["untouched"] == []  # every conv stays on Sculpt's NHWC kernels
    assert {layer["name"] for layer in facts["layers"]} == CONV_NODES


def test_stack_reduces_become_pairwise_ops():
    from tvm import relax

    from runtimes.tvm.importer import import_onnx
    from runtimes.tvm.legalize_minmax import legalize_minmax

    module = legalize_minmax(import_onnx(minmax_model(), {"x": (1, 3, 6, 6)}))
    ops = []
    relax.analysis.post_order_visit(
        module["main"], lambda e: ops.append(e.op.name) if isinstance(e, relax.Call) and hasattr(e.op, "name") else None
    )
    assert not {"relax.stack", "relax.max", "relax.min", "relax.sum", "relax.mean", "relax.broadcast_to"} & set(ops)
    assert (ops.count("relax.maximum"), ops.count("relax.minimum")) == (3, 1)  # Max(a1, 0); Max of three: 2
