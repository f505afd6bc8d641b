"""Models from the wild: load-time normalisation, report truth (params, MACs with reasons), recurrent channel
handlers, and the ONNX Model Zoo graphs shipped inside the onnx package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from wild_models import helper_rnn, paddle_cnn, paddle_sequence, paddle_weight_elements, sample_data, zoo_ir3

from optimizer.cli import main
from optimizer.model import save_model
from optimizer.normalize import normalize
from optimizer.report import layer_rows, model_stats
from passes import PassContext
from passes.structured_sparse import StructuredSparse, count_params
from runtimes import ort

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _outputs(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return list(ort.load(model).run(feeds).values())


# --- normalisation ----------------------------------------------------------------------------------------------


def test_ir3_weights_stop_being_graph_inputs_and_constant_of_shape_weights_fold():
    source = zoo_ir3(constant_of_shape=True)
    model, notes = normalize(source)
    assert model.ir_version >= 4 and [i.name for i in model.graph.input] == ["data"]
    assert "ConstantOfShape" not in {n.op_type for n in model.graph.node}
    assert {"conv_w", "fc_w"} <= {t.name for t in model.graph.initializer}
    assert any("IR 3 ->" in n for n in notes)
    feeds = sample_data(source)
    for got, want in zip(_outputs(model, feeds), _outputs(source, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_overridable_initializers_stay_graph_inputs_and_are_not_folded():
    """IR >= 4: an initializer that is also a graph input is a default the user may override; nothing computed
    from it may be frozen (here Mul(scale, 2) only depends on it)."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["scale", "two"], ["s2"], name="double"),
         helper.make_node("Mul", ["x", "s2"], ["y"], name="apply")],
        "defaults",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.array(1.5, np.float32), "scale"),
         numpy_helper.from_array(np.array(2.0, np.float32), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    normalized, _ = normalize(model)
    assert [i.name for i in normalized.graph.input] == ["x", "scale"]
    assert [n.name for n in normalized.graph.node] == ["double", "apply"]
    x = np.ones((2, 3), np.float32)
    assert np.allclose(_outputs(normalized, {"x": x, "scale": np.array(4.0, np.float32)})[0], 8.0)


def test_constant_node_weights_become_initializers_and_qdq_stays_integer():
    model, notes = normalize(paddle_cnn())
    assert "Constant" not in {n.op_type for n in model.graph.node}
    assert any("Constant-node" in n for n in notes)
    q = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["w"], name="dq"),
         helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(np.ones((4, 2), np.int8), "wq"), numpy_helper.from_array(np.float32(0.5), "s"),
         numpy_helper.from_array(np.int8(0), "z")])
    quantized = normalize(helper.make_model(q, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))[0]
    assert [n.op_type for n in quantized.graph.node] == ["DequantizeLinear", "MatMul"]


# --- report truth -------------------------------------------------------------------------------------------------


def test_paddle_inspect_lists_every_conv_and_matmul_with_params(tmp_path, capsys):
    path, report = tmp_path / "paddle.onnx", tmp_path / "inspect.json"
    save_model(paddle_cnn(), path)
    assert main(["inspect", str(path), "--report", str(report)]) == 0
    facts = json.loads(report.read_text())
    assert [(r["node"], r["op"]) for r in facts["layers"]] == [
        ("conv2d_0", "Conv"), ("conv2d_1", "Conv"), ("matmul_0", "MatMul")]
    assert [r["params"] for r in facts["layers"]] == [8 * 27, 12 * 8 * 9, 432 * 10]
    assert abs(facts["stats"]["params"] - paddle_weight_elements()) <= 0.01 * paddle_weight_elements()
    # per sample: conv1 8x8x8 outputs of 27 MACs, conv2 12x6x6 of 72, matmul 10 of 432
    assert facts["stats"]["macs"] == 8 * 64 * 27 + 12 * 36 * 72 + 10 * 432
    assert "6 Constant-node weights made initializers" in capsys.readouterr().err


def test_unknown_dims_say_why_and_calibration_sizes_fill_them():
    model = normalize(paddle_sequence())[0]
    stats = model_stats(model)
    assert stats["macs"] is None
    assert stats["macs_note"] == ("unknown: dim 1 ('p2o.DynamicDimension.1') of input 'x' has no size; "
                                  "give --calibration")
    assert model_stats(model, input_shapes={"x": (32, 20, 16)})["macs"] == 20 * (16 * 32 + 32 * 8)


def test_macs_survive_folding_that_renames_a_layers_output():
    """A Conv whose output goes through an Identity into a Shape-driven Reshape: folding the dynamic shape
    drops the Identity and renames the Conv's output, and the layer must still find its shape."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("Identity", ["c"], ["i"], name="id"),
             helper.make_node("Shape", ["i"], ["s"], name="shape", end=2),
             helper.make_node("Concat", ["s", "minus1"], ["target"], name="cat", axis=0),
             helper.make_node("Reshape", ["i", "target"], ["y"], name="flat")]
    minus1 = numpy_helper.from_array(np.array([-1], np.int64), "minus1")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, minus1])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert model_stats(model, input_shapes={"x": (1, 3, 6, 10)})["macs"] == 8 * 6 * 10 * 27


@pytest.mark.parametrize("op, gates", [("RNN", 1), ("GRU", 3), ("LSTM", 4)])
def test_recurrent_macs_count_every_gate_step_and_direction(op, gates):
    directions = 2 if op == "LSTM" else 1
    rows = {r["op"]: r for r in layer_rows(helper_rnn(op, directions), input_shapes={"x": (7, 3, 5)})}
    hidden, inputs, steps, samples = 6, 10, 7, 3  # x is [seq, batch, 5]: the open batch axis takes the data's 3
    assert rows[op]["macs"] == steps * samples * directions * gates * hidden * (inputs + hidden)
    assert rows[op]["params"] == directions * gates * hidden * (inputs + hidden + 2)


def test_attention_matmuls_count_and_raw_equals_cleaned(tmp_path):
    """A torch.onnx BERT-style encoder with shape subgraphs: the MACs include Q·Kᵀ and A·V, and the raw export
    and its cleaned twin report the same figure."""
    from wild_models import torch_encoder

    raw, cleaned, data = tmp_path / "raw.onnx", tmp_path / "clean.onnx", tmp_path / "ids.npz"
    save_model(torch_encoder(), raw)
    np.savez(data, input_ids=np.random.default_rng(0).integers(0, 50, (8, 12)).astype(np.int64))
    assert main([str(raw), "--pass", "cleanup", "-o", str(cleaned), "--calibration", str(data)]) == 0
    macs = []
    for path in (raw, cleaned):
        report = tmp_path / f"{path.stem}.json"
        assert main(["inspect", str(path), "--calibration", str(data), "--report", str(report)]) == 0
        macs.append(json.loads(report.read_text())["stats"]["macs"])
    d, t, ffn, layers, heads = 16, 12, 32, 2, 2
    per_layer = t * d * 3 * d + 2 * heads * t * t * (d // heads) + t * d * d + 2 * t * d * ffn
    assert macs[0] == layers * per_layer
    assert abs(macs[1] - macs[0]) <= 0.01 * macs[0]


def _computed_reshape_model() -> onnx.ModelProto:
    """Conv -> Reshape to [n, C, -1] with the target made of Shape/Slice/Concat -> tokens -> MLP, at opset 12
    (a Paddle2ONNX/older torch export): onnx's Reshape inference at this opset gives the result no rank."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)
             for name, shape in (("conv_w", (16, 8, 1, 1)), ("w1", (16, 32)), ("w2", (32, 4)))]
    inits += [numpy_helper.from_array(np.array(v, np.int64), name)
              for name, v in (("zero", [0]), ("two", [2]), ("minus", [-1]))]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Shape", ["r"], ["shape"], name="shape"),
        helper.make_node("Slice", ["shape", "zero", "two"], ["lead"], name="lead"),
        helper.make_node("Concat", ["lead", "minus"], ["target"], name="target", axis=0),
        helper.make_node("Reshape", ["r", "target"], ["flat"], name="flatten"),
        helper.make_node("Transpose", ["flat"], ["tokens"], name="tokens", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["tokens", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu1"),
        helper.make_node("MatMul", ["hr", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(nodes, "computed_reshape",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, None, "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)], ir_version=7)


def test_a_reshape_to_a_computed_shape_keeps_its_rank_and_the_layers_after_it_prune():
    """onnx leaves the Reshape's output (and all after it) without a rank; onnxruntime's symbolic shape inference
    fills those in, so the MLP after it is analysed like any other (PP-OCRv4 rec's neck is this case)."""
    from passes.graph.ir import inferred_value_info

    model = _computed_reshape_model()
    onnx_only = {v.name for v in onnx.shape_inference.infer_shapes(model, data_prop=True).graph.value_info
                 if v.type.tensor_type.HasField("shape")}
    assert "flat" not in onnx_only and "h" not in onnx_only
    shapes = {v.name: len(v.type.tensor_type.shape.dim) for v in inferred_value_info(model)}
    assert shapes["flat"] == 3 and shapes["h"] == 3
    pruned, details = StructuredSparse(StructuredSparse.Options(ratio=0.5)).run(model, PassContext())
    fc1 = next(g for g in details["groups"] if g["producers"] == ["fc1"])
    assert (fc1["channels_before"], fc1["channels_after"]) == (32, 16)
    x = np.random.default_rng(1).standard_normal((2, 8, 3, 5)).astype(np.float32)
    assert _outputs(pruned, {"x": x})[0].shape == (2, 15, 4)


# --- recurrent channel handlers ---------------------------------------------------------------------------------


def test_conv_lstm_linear_loses_most_weights_at_half_ratio(tmp_path):
    from wild_models import torch_conv_rnn

    path, data, out = tmp_path / "ocr.onnx", tmp_path / "x.npz", tmp_path / "out.onnx"
    source = torch_conv_rnn("lstm", channels=48, hidden=64)
    save_model(source, path)
    np.savez(data, **sample_data(source, samples=16))
    assert main([str(path), "--pass", "structured-sparse:ratio=0.5", "-o", str(out), "--calibration", str(data)]) == 0
    result = onnx.load(out)
    onnx.checker.check_model(result, full_check=True)
    assert count_params(result) <= 0.6 * count_params(normalize(source)[0])
    lstm = next(n for n in result.graph.node if n.op_type == "LSTM")
    assert helper.get_attribute_value(next(a for a in lstm.attribute if a.name == "hidden_size")) == 32
    feeds = dict(np.load(data))
    assert _outputs(result, feeds)[0].shape == _outputs(source, feeds)[0].shape


@pytest.mark.parametrize("op, candidate, directions", [("LSTM", 3, 1), ("GRU", 2, 1), ("RNN", 0, 1), ("LSTM", 3, 2)],
                         ids=["lstm", "gru", "rnn", "bidirectional-lstm"])
def test_silent_hidden_units_are_removed_exactly(op, candidate, directions):
    """Units whose candidate-gate rows and bias are zero output exactly 0: criterion=zero removes them, together
    with their R columns (in every direction), and the outputs do not move."""
    model = helper_rnn(op, directions)
    gates, hidden = {"RNN": 1, "GRU": 3, "LSTM": 4}[op], 6
    init = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    silent = [1, 4]
    for unit in silent:
        row = candidate * hidden + unit
        init["W"][:, row], init["R"][:, row] = 0, 0  # every direction
        init["B"][:, row], init["B"][:, gates * hidden + row] = 0, 0
    del model.graph.initializer[:]
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in init.items())
    result = StructuredSparse.from_spec({"criterion": "zero"}).run(model, PassContext()).model
    node = next(n for n in result.graph.node if n.op_type == op)
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "hidden_size")) == 4
    feeds = sample_data(model, samples=3)
    np.testing.assert_allclose(_outputs(result, feeds)[0], _outputs(model, feeds)[0], rtol=1e-5, atol=1e-6)


# --- the ONNX Model Zoo graphs shipped inside the onnx package ---------------------------------------------------


@pytest.mark.parametrize("name", ["light_squeezenet", "light_inception_v1", "light_shufflenet"])
def test_light_zoo_models_clean_and_prune(name, tmp_path, capfd):
    source = LIGHT / f"{name}.onnx"
    cleaned, pruned = tmp_path / "clean.onnx", tmp_path / "pruned.onnx"
    assert main([str(source), "--pass", "cleanup", "-o", str(cleaned)]) == 0
    assert main([str(source), "--pass", "structured-sparse:ratio=0.5", "-o", str(pruned)]) == 0
    err = capfd.readouterr().err
    assert "threshold" not in err and "[W]" not in err and "MiB':" not in err
    original = onnx.load(source)
    expected = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in original.graph.output]
    for path in (cleaned, pruned):
        model = onnx.load(path)
        onnx.checker.check_model(model, full_check=True)
        feeds = sample_data(model, samples=1)
        assert [list(o.shape) for o in _outputs(model, feeds)] == expected
    assert count_params(onnx.load(pruned)) <= 0.7 * count_params(onnx.load(cleaned))


def test_reram_runs_a_conv_gru_model_with_the_gru_digital():
    """The crossbars take the convolutions and the classifier; the GRU runs in the digital part (ONNX Runtime)."""
    from wild_models import torch_conv_rnn

    import runtimes

    model = torch_conv_rnn("gru")
    feeds = sample_data(model)
    got = runtimes.load("reram", model).run(feeds)["y"]
    want = _outputs(model, feeds)[0]
    assert got.shape == want.shape
    assert float(np.dot(got.ravel(), want.ravel()) / np.linalg.norm(got) / np.linalg.norm(want)) >= 0.999
