"""The graph-edit layer: each verb on a tiny graph, checked with the ONNX checker and against numpy."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optimizer.verify import run_ort
from passes.graph.edit import GraphEdit

X = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)


def relu_then_neg() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Neg", ["r"], ["y"], name="neg")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="sculpt.test", value="kept")
    return model


def checked(model: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(model, full_check=True)
    return model


def test_insert_after_a_graph_output_and_an_inner_tensor():
    source = relu_then_neg()
    edit = GraphEdit(source)
    two = edit.add_initializer(np.full(3, 2.0, np.float32), "two")
    edit.insert_after(edit.tensor("r"), "Mul", [two])
    edit.insert_after(edit.tensor("y"), "Add", [two])
    model = checked(edit.to_model())
    np.testing.assert_allclose(run_ort(model, {"x": X})["y"], -2 * np.maximum(X, 0) + 2, rtol=1e-6)
    assert [o.name for o in model.graph.output] == ["y"] and len(source.graph.node) == 2  # source untouched
    assert {p.key: p.value for p in model.metadata_props} == {"sculpt.test": "kept"}


def test_replace_node_remove_node_and_fresh_names():
    edit = GraphEdit(relu_then_neg())
    assert edit.fresh("relu") == "relu_2" and edit.fresh("relu") == "relu_3" and edit.fresh("new") == "new"
    edit.replace_node(edit.node("neg"), "Abs", [edit.tensor("r")])
    edit.remove_node(edit.node("relu"), edit.tensor("x"))
    model = checked(edit.to_model())
    assert [n.op_type for n in model.graph.node] == ["Abs"]
    np.testing.assert_allclose(run_ort(model, {"x": X})["y"], np.abs(X))


def test_replace_subgraph_and_constant_nodes_become_initializers():
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.float32(3.0))),
         helper.make_node("Mul", ["x", "c"], ["m"], name="mul"), helper.make_node("Relu", ["m"], ["y"], name="relu")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    edit = GraphEdit(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    constant = next(n for n in edit.graph.nodes if n.op == "Constant")
    edit.constant_node_to_initializer(constant, np.float32(3.0))
    edit.replace_subgraph([edit.node("mul"), edit.node("relu")], lambda outputs: [
        edit.add_node("Sigmoid", [edit.tensor("x")], outputs, hint="sigmoid")])
    model = checked(edit.to_model())
    assert [n.op_type for n in model.graph.node] == ["Sigmoid"] and not model.graph.initializer  # c swept: unread
    np.testing.assert_allclose(run_ort(model, {"x": X})["y"], 1 / (1 + np.exp(-X)), rtol=1e-6)
