"""Poisoned data is refused; verification fails on NaN/Inf, refuses zero samples, uses >= 32 samples; quality floor."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.cli import main
from optimizer.errors import VerificationError
from optimizer.verify import QualityFloor, class_score_outputs, compare, run_ort


def _mlp(hidden: int = 32) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, hidden)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, 10)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    onnx.save(_mlp(), "m.onnx")
    x = np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32)
    np.savez("cal.npz", x=x)
    return tmp_path, x


def _one_error_line(capsys) -> str:
    """The one error line (progress and notes may precede it); no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and "Traceback" not in "\n".join(err), err
    return errors[0]


def _poisoned(x):
    nan, inf = x.copy(), x.copy()
    nan[3, 2] = np.nan
    inf[5, 0] = -np.inf
    return {"nan": ({"x": nan}, "1 NaN value (first at index (3, 2))"),
            "inf": ({"x": inf}, "1 Inf value (first at index (5, 0))"),
            "empty": ({"x": x[:0]}, "is empty (shape [0, 8])"),
            "no arrays": ({}, "holds no arrays"),
            "object labels": ({"x": x, "labels": np.array(["a"] * 40)}, "has dtype <U1")}


@pytest.mark.parametrize("case", ["nan", "inf", "empty", "no arrays", "object labels"])
@pytest.mark.parametrize("pass_spec", ["cleanup", "quantize"])
def test_poisoned_calibration_is_refused(case, pass_spec, work, capsys):
    folder, x = work
    arrays, message = _poisoned(x)[case]
    np.savez("bad.npz", **arrays)
    assert main(["m.onnx", "--pass", pass_spec, "-o", "o.onnx", "--calibration", "bad.npz"]) == 2
    line = _one_error_line(capsys)
    assert "bad.npz" in line and message in line
    assert not (folder / "o.onnx").exists()


def test_unreadable_data_files_name_the_fix(work, capsys):
    folder, x = work
    (folder / "zero.npz").write_bytes(b"")
    np.save("plain.npy", x)
    (folder / "plain.npy").rename(folder / "plain.npz")
    (folder / "cut.npz").write_bytes((folder / "cal.npz").read_bytes()[:100])
    cases = {"zero.npz": "is empty (0 bytes)", "plain.npz": "is a .npy file", "cut.npz": "not a readable .npz"}
    for name, message in cases.items():
        assert main(["m.onnx", "--pass", "cleanup", "-o", "o.onnx", "--calibration", name]) == 2
        line = _one_error_line(capsys)
        assert name in line and message in line


def test_two_dimensional_labels_are_refused_with_the_fix(work, capsys):
    _, x = work
    np.savez("eval.npz", x=x, labels=np.eye(10)[np.arange(40) % 10])
    assert main(["m.onnx", "--pass", "cleanup", "-o", "o.onnx", "--eval", "eval.npz"]) == 2
    assert "one class index per sample" in _one_error_line(capsys)


def test_pass_producing_nan_fails_verification(work, capsys, monkeypatch):
    from passes import PassResult
    from passes.cleanup import Cleanup

    def poison(self, model, ctx):
        broken = onnx.ModelProto()
        broken.CopyFrom(model)
        w = numpy_helper.to_array(broken.graph.initializer[1]).copy()
        w[0, 0] = np.nan
        broken.graph.initializer[1].CopyFrom(numpy_helper.from_array(w, "w2"))
        return PassResult(broken, {})

    monkeypatch.setattr(Cleanup, "run", poison)
    assert main(["m.onnx", "--pass", "cleanup", "-o", "o.onnx", "--calibration", "cal.npz"]) == 1
    assert "NaN/Inf" in _one_error_line(capsys)
    assert not (work[0] / "o.onnx").exists()


def test_input_model_producing_nan_fails_verification(work, capsys):
    graph = helper.make_graph([helper.make_node("Sqrt", ["x"], ["y"])], "sqrt",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "sqrt.onnx")
    assert main(["sqrt.onnx", "--pass", "cleanup", "-o", "o.onnx"]) == 1  # N(0,1) inputs: sqrt of negatives
    assert "reference model's outputs hold" in _one_error_line(capsys)
    assert not (work[0] / "o.onnx").exists()


def test_compare_refuses_zero_samples_and_flags_nonfinite():
    with pytest.raises(VerificationError, match="nothing to compare"):
        compare({"y": np.zeros((0, 10))}, {"y": np.zeros((0, 10))})
    result = compare({"y": np.ones((4, 10))}, {"y": np.full((4, 10), np.nan)})
    assert result["nonfinite"] == {"reference": 0, "candidate": 40} and result["cosine"] == 0.0
    assert "failure" in result


def test_random_verification_uses_32_samples_and_says_so(work):
    assert main(["m.onnx", "--pass", "cleanup", "-o", "o.onnx", "--report", "r.json"]) == 0
    report = json.loads((work[0] / "r.json").read_text())
    assert report["verification"]["samples"] == 32
    assert report["verification"]["inputs"].startswith("seeded random")
    assert main(["m.onnx", "--pass", "cleanup", "-o", "o.onnx", "--report", "r.json", "--calibration", "cal.npz"]) == 0
    report = json.loads((work[0] / "r.json").read_text())
    assert report["verification"] == {"inputs": "calibration data", "samples": 40}


def test_quality_floor_warns_and_strict_fails(work, capsys):
    folder, x = work
    args = ["m.onnx", "--pass", "sparsify:sparsity=0.95", "-o", "o.onnx", "--calibration", "cal.npz",
            "--report", "r.json"]
    assert main(args) == 0
    assert "fell below the quality floor" in capsys.readouterr().err
    verify = json.loads((folder / "r.json").read_text())["passes"][0]["verify"]
    pruned = onnx.load("o.onnx")
    expected = compare(run_ort(_mlp(), {"x": x}), run_ort(pruned, {"x": x}))
    assert verify["cosine"] == pytest.approx(expected["cosine"]) and verify["cosine"] < 0.99
    (folder / "o.onnx").unlink()
    (folder / "r.json").unlink()
    assert main([*args, "--strict"]) == 1
    assert "--strict" in _one_error_line(capsys)
    assert not (folder / "o.onnx").exists() and not (folder / "r.json").exists()
    assert main([*args, "--strict", "--min-cosine", "0", "--min-agreement", "0"]) == 0


def _embedder() -> onnx.ModelProto:
    """The MLP with its output L2-normalised per sample: an embedding, whose argmax over features means nothing."""
    model = _mlp()
    model.graph.output[0].name = "y_raw"
    model.graph.node[-1].output[0] = "y_raw"
    model.graph.node.append(helper.make_node("LpNormalization", ["y_raw"], ["e"], axis=-1, p=2))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("e", TensorProto.FLOAT, ["n", 10]))
    return model


def test_top1_agreement_only_for_class_scores(work, capsys):
    folder, x = work
    assert class_score_outputs(_mlp()) == [True] and class_score_outputs(_embedder()) == [False]
    ref, new = {"e": np.eye(4, 10)}, {"e": np.eye(4, 10)[::-1]}
    assert compare(ref, new)["top1_agreement"] == 0.0  # without marks every multi-column output counts
    assert compare(ref, new, [False])["top1_agreement"] is None
    onnx.save(_embedder(), "e.onnx")
    args = ["e.onnx", "--pass", "sparsify:sparsity=0.3", "-o", "o.onnx", "--calibration", "cal.npz",
            "--report", "r.json", "--min-cosine", "0.5"]
    assert main(args) == 0
    verify = json.loads((folder / "r.json").read_text())["passes"][0]["verify"]
    expected = compare(run_ort(_embedder(), {"x": x}), run_ort(onnx.load("o.onnx"), {"x": x}))
    assert verify["top1_agreement"] is None and verify["cosine"] == pytest.approx(expected["cosine"])
    assert "quality floor" not in capsys.readouterr().err  # cosine above 0.5; no meaningless argmax to fail on


def test_quality_floor_shortfall_text():
    floor = QualityFloor()
    assert floor.shortfall({"cosine": 0.999, "top1_agreement": 1.0}) is None
    assert floor.shortfall({"cosine": 0.13, "top1_agreement": 0.4}) == (
        "cosine 0.130000 < 0.99, top-1 agreement 0.4000 < 0.95")


def _overridable() -> onnx.ModelProto:
    """y = x * s + b with s an overridable input (default 2) and b a plain constant."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "s"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])], "over",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[numpy_helper.from_array(np.full((1, 4), 2, np.float32), "s"),
                     numpy_helper.from_array(np.full((1, 4), 0.5, np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_cleanup_keeps_overridable_initializers_as_inputs(tmp_path):
    onnx.save(_overridable(), tmp_path / "over.onnx")
    assert main([str(tmp_path / "over.onnx"), "--pass", "cleanup", "-o", str(tmp_path / "c.onnx")]) == 0
    cleaned = onnx.load(tmp_path / "c.onnx")
    assert [i.name for i in cleaned.graph.input] == ["x", "s"]
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    np.testing.assert_array_equal(run_ort(cleaned, {"x": x})["y"], x * 2 + 0.5)
    s = np.full((1, 4), -3, np.float32)
    np.testing.assert_array_equal(run_ort(cleaned, {"x": x, "s": s})["y"], x * -3 + 0.5)
    frozen_path = str(tmp_path / "f.onnx")
    assert main([str(tmp_path / "over.onnx"), "--pass", "cleanup", "--freeze-inputs", "-o", frozen_path]) == 0
    frozen = onnx.load(tmp_path / "f.onnx")
    assert [i.name for i in frozen.graph.input] == ["x"]
    np.testing.assert_array_equal(run_ort(frozen, {"x": x})["y"], x * 2 + 0.5)


def test_repeated_option_and_no_op_pass(work, capsys):
    assert main(["m.onnx", "--pass", "sparsify:sparsity=0.5,sparsity=0.6", "-o", "o.onnx"]) == 2
    assert "given twice" in _one_error_line(capsys)
    assert main(["m.onnx", "--pass", "sparsify:pattern=1000x1000", "-o", "o.onnx", "--calibration", "cal.npz"]) == 0
    err = capsys.readouterr().err
    assert err.count("zeroed no weight") == 1


def test_quantize_says_it_leaves_recurrent_and_subgraph_weights_float(tmp_path, capsys):
    rng = np.random.default_rng(0)
    hidden = 4
    w = numpy_helper.from_array(rng.standard_normal((1, 3 * hidden, 8)).astype(np.float32), "W")
    r = numpy_helper.from_array(rng.standard_normal((1, 3 * hidden, hidden)).astype(np.float32), "R")
    fc = numpy_helper.from_array(rng.standard_normal((hidden, 10)).astype(np.float32), "fc")
    nodes = [helper.make_node("GRU", ["x", "W", "R"], ["", "h"], name="gru", hidden_size=hidden),
             helper.make_node("Squeeze", ["h", "axes"], ["hs"]),
             helper.make_node("MatMul", ["hs", "fc"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "gru", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])],
                              [w, r, fc, numpy_helper.from_array(np.array([0], np.int64), "axes")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "gru.onnx")
    assert main([str(tmp_path / "gru.onnx"), "--pass", "quantize", "-o", str(tmp_path / "q.onnx"),
                 "--min-cosine", "0", "--min-agreement", "0"]) == 0
    assert "GRU 'gru' stays float (recurrent (GRU) weights are not quantized" in capsys.readouterr().err
