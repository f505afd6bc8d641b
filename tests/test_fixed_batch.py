"""Fixed-batch models fed more samples than their batch: calibration, verification, run and inspect chunk the data."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.cli import main
from optimizer.data import feed_in_chunks, fixed_batch, graph_inputs
from optimizer.errors import RuntimeFailure
from optimizer.model import save_model
from runtimes import ort

SAMPLES = 32


def _fixed_batch_mlp(batch: int = 1) -> onnx.ModelProto:
    """x float[batch, 128] -> Gemm(64) -> Relu -> Gemm(10): an export that fixed its batch axis."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1),
        ],
        "fixed_batch_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
        [
            numpy_helper.from_array(rng.standard_normal((64, 128)).astype(np.float32) * 0.1, "w1"),
            numpy_helper.from_array(rng.standard_normal(64).astype(np.float32) * 0.1, "b1"),
            numpy_helper.from_array(rng.standard_normal((10, 64)).astype(np.float32) * 0.1, "w2"),
            numpy_helper.from_array(rng.standard_normal(10).astype(np.float32) * 0.1, "b2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _samples(count: int = SAMPLES) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((count, 128)).astype(np.float32)


def _reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """One ORT call per sample, with the exact batch the model declares (the independent reference)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])


@pytest.mark.parametrize("batch, count", [(1, 32), (4, 32), (4, 30), (8, 3)], ids=lambda v: str(v))
def test_ort_session_feeds_fixed_batch_in_chunks(batch, count):
    model = _fixed_batch_mlp(batch)
    assert fixed_batch(graph_inputs(model)) == batch
    x = _samples(count)
    got = ort.load(model).run({"x": x})["y"]
    assert got.shape == (count, 10)
    np.testing.assert_allclose(got, _reference(_fixed_batch_mlp(1), x), rtol=1e-5, atol=1e-6)


def test_open_batch_is_one_call_and_side_inputs_go_whole():
    calls = []

    def run(feeds):
        calls.append({k: v.shape for k, v in feeds.items()})
        return {"y": feeds["x"] * feeds["t"][0]}

    out = feed_in_chunks(run, {"x": np.ones((5, 3)), "t": np.array([2.0])}, batch=2)
    assert out["y"].shape == (5, 3) and np.all(out["y"] == 2.0)
    assert calls == [{"x": (2, 3), "t": (1,)}] * 3
    calls.clear()
    feed_in_chunks(run, {"x": np.ones((5, 3)), "t": np.array([2.0])}, batch=None)
    assert calls == [{"x": (5, 3), "t": (1,)}]


def test_output_without_batch_axis_is_a_clear_failure():
    with pytest.raises(RuntimeFailure, match="not batch-first"):
        feed_in_chunks(lambda feeds: {"total": np.float32(feeds["x"].sum())}, {"x": np.ones((4, 2))}, batch=1)


@pytest.mark.parametrize(
    "spec",
    ["structured-sparse:ratio=0.5", "quantize", "activation-prune:sparsity=0.5"],
    ids=["structured-sparse", "quantize", "activation-prune"],
)
def test_fixed_batch_model_calibrates_on_32_samples(spec, tmp_path, capsys):
    path, data, out, report = tmp_path / "m.onnx", tmp_path / "cal.npz", tmp_path / "out.onnx", tmp_path / "r.json"
    save_model(_fixed_batch_mlp(1), path)
    np.savez(data, x=_samples())
    code = main([str(path), "--pass", spec, "-o", str(out), "--calibration", str(data), "--report", str(report)])
    assert code == 0, capsys.readouterr().err
    result = onnx.load(out)
    onnx.checker.check_model(result, full_check=True)
    outputs = ort.load(result).run({"x": _samples()})["y"]
    assert outputs.shape == (SAMPLES, 10) and np.all(np.isfinite(outputs))
    verify = json.loads(report.read_text())["passes"][0]["verify"]
    assert verify["cosine"] > 0.5


def test_run_and_inspect_chunk_a_fixed_batch(tmp_path, capsys):
    model = _fixed_batch_mlp(1)
    path, data, out = tmp_path / "m.onnx", tmp_path / "in.npz", tmp_path / "out.npz"
    save_model(model, path)
    np.savez(data, x=_samples())
    assert main(["run", str(path), "--input", str(data), "--output", str(out)]) == 0
    np.testing.assert_allclose(np.load(out)["y"], _reference(model, _samples()), rtol=1e-5, atol=1e-6)
    assert main(["inspect", str(path), "--calibration", str(data)]) == 0
    assert "relu" in capsys.readouterr().out


def test_a_sequence_first_layout_has_no_fixed_batch_on_axis_0():
    seq_first = helper.make_tensor_value_info("x", TensorProto.FLOAT, [7, "batch", 5])
    assert fixed_batch([seq_first]) is None
    assert fixed_batch([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "sequence", 5])]) == 1
