"""The `optimize` CLI: the pipeline on the digits CNN, bad inputs, external data, run/bench/compare."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.cli import main
from optimizer.model import save_model
from optimizer.verify import run_ort

REPORT_KEYS = {"input", "output", "passes", "eval"}
STATS_KEYS = {"params", "macs", "bytes", "nodes", "weight_sparsity"}
VERIFY_KEYS = {"max_abs_err", "max_rel_err", "cosine", "top1_agreement"}


def test_cleanup_folds_batchnorm_and_reports(digits_assets, tmp_path, capsys):
    source = onnx.load(digits_assets.model)
    assert sum(n.op_type == "BatchNormalization" for n in source.graph.node) == 3
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = main([str(digits_assets.model), "--pass", "cleanup", "-o", str(out), "--report", str(report),
                 "--calibration", str(digits_assets.calibration), "--eval", str(digits_assets.eval)])
    assert code == 0
    result = onnx.load(out)
    assert not any(n.op_type == "BatchNormalization" for n in result.graph.node)
    r = json.loads(report.read_text())
    assert REPORT_KEYS <= set(r)
    assert STATS_KEYS <= set(r["input"]) and STATS_KEYS <= set(r["output"])
    entry = r["passes"][0]
    assert {"name", "options", "contract", "seconds", "verify", "details"} <= set(entry)
    assert VERIFY_KEYS <= set(entry["verify"])
    assert entry["verify"]["max_abs_err"] <= 1e-5
    assert r["eval"]["metric"] == "top1" and r["eval"]["input"] == r["eval"]["output"]
    assert "cleanup" in capsys.readouterr().out


def test_passes_lists_cleanup_options(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "cleanup" in out and "fold_batchnorm" in out and "exact" in out


def _bad_input_cases(digits, tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(digits.model.read_bytes()[:5000])
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=np.zeros((2, 1, 8, 8), np.float32))
    model, out = str(digits.model), str(tmp_path / "out.onnx")
    return {
        "missing file": ([str(tmp_path / "nope.onnx"), "--pass", "cleanup", "-o", out], 2, "no such file"),
        "text file": ([str(text), "--pass", "cleanup", "-o", out], 2, "not a readable ONNX model"),
        "truncated": ([str(truncated), "--pass", "cleanup", "-o", out], 2, "not a readable ONNX model"),
        "unknown pass": ([model, "--pass", "shrink", "-o", out], 2, "unknown pass 'shrink'"),
        "unknown option": ([model, "--pass", "cleanup:nonsense=1", "-o", out], 2, "unknown option 'nonsense'"),
        "missing out dir": ([model, "--pass", "cleanup", "-o", str(tmp_path / "no" / "out.onnx")], 2,
                            "does not exist"),
        "npz mismatch": ([model, "--pass", "cleanup", "-o", out, "--calibration", str(wrong)], 2,
                         "no array for model input 'input'"),
    }


@pytest.mark.parametrize("case", ["missing file", "text file", "truncated", "unknown pass", "unknown option",
                                  "missing out dir", "npz mismatch"])
def test_bad_inputs_one_line_exit_code_no_output(case, digits_assets, tmp_path, capsys):
    args, code, message = _bad_input_cases(digits_assets, tmp_path)[case]
    before = digits_assets.model.read_bytes()
    assert main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out.onnx").exists()
    assert digits_assets.model.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_console_script_exit_code_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "optimizer.cli", str(tmp_path / "x.onnx"), "--pass", "cleanup",
                             "-o", str(tmp_path / "y.onnx")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "no such file" in result.stderr


def test_external_data_round_trip(digits_assets, tmp_path):
    source = tmp_path / "ext.onnx"
    onnx.save_model(onnx.load(digits_assets.model), str(source), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    out = tmp_path / "out" / "clean.onnx"
    out.parent.mkdir()
    assert main([str(source), "--pass", "cleanup", "-o", str(out)]) == 0
    written = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in written.graph.initializer)
    feeds = {"input": np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)}
    a = run_ort(onnx.load(str(source)), feeds)["logits"]
    b = run_ort(onnx.load(str(out)), feeds)["logits"]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _constant_of_shape_model() -> onnx.ModelProto:
    shape = numpy_helper.from_array(np.array([4, 3], np.int64), "w_shape")
    nodes = [
        helper.make_node("ConstantOfShape", ["w_shape"], ["w_fill"],
                         value=numpy_helper.from_array(np.array([0.5], np.float32))),
        helper.make_node("Range", ["start", "limit", "delta"], ["ramp"]),
        helper.make_node("Add", ["w_fill", "ramp"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes, "cos", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        initializer=[shape, numpy_helper.from_array(np.array(0, np.float32), "start"),
                     numpy_helper.from_array(np.array(3, np.float32), "limit"),
                     numpy_helper.from_array(np.array(1, np.float32), "delta")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_constant_of_shape_weights_become_initializers(tmp_path):
    source, out = tmp_path / "cos.onnx", tmp_path / "out.onnx"
    save_model(_constant_of_shape_model(), source)
    assert main([str(source), "--pass", "cleanup", "-o", str(out)]) == 0
    result = onnx.load(out)
    assert [n.op_type for n in result.graph.node] == ["MatMul"]
    weight = {t.name: numpy_helper.to_array(t) for t in result.graph.initializer}[result.graph.node[0].input[1]]
    np.testing.assert_array_equal(weight, np.full((4, 3), 0.5, np.float32) + np.arange(3, dtype=np.float32))


def test_bench_two_models_prints_ratio(digits_assets, tmp_path, capsys):
    clean = tmp_path / "clean.onnx"
    assert main([str(digits_assets.model), "--pass", "cleanup", "-o", str(clean)]) == 0
    capsys.readouterr()
    report = tmp_path / "bench.json"
    assert main(["bench", str(digits_assets.model), str(clean), "--runtime", "ort", "--runs", "5",
                 "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "median ms" in out and "clean.onnx" in out
    results = json.loads(report.read_text())["results"]
    assert len(results) == 2 and results[0]["ratio"] == 1.0
    assert {"model", "runtime", "batch", "threads", "median_ms", "p90_ms", "rss_delta_mb", "ratio"} <= set(results[1])
    assert results[1]["ratio"] == pytest.approx(results[1]["median_ms"] / results[0]["median_ms"])


def test_run_writes_onnxruntime_outputs(digits_assets, tmp_path):
    out = tmp_path / "y.npz"
    assert main(["run", str(digits_assets.model), "--input", str(digits_assets.eval), "--output", str(out)]) == 0
    data = np.load(digits_assets.eval)
    expected = run_ort(onnx.load(digits_assets.model), {"input": data["input"]})["logits"]
    np.testing.assert_array_equal(np.load(out)["logits"], expected)


def test_compare_and_inspect(digits_assets, capsys):
    assert main(["compare", str(digits_assets.model), str(digits_assets.model)]) == 0
    assert "max_abs_err      0" in capsys.readouterr().out
    assert main(["inspect", str(digits_assets.model)]) == 0
    out = capsys.readouterr().out
    assert "/3/Conv" in out and "32x16x3x3" in out and "294,912" in out


def test_exact_pass_that_changes_outputs_fails(digits_assets, tmp_path, capsys, monkeypatch):
    from passes import PassResult
    from passes.cleanup import Cleanup

    def corrupt(self, model, ctx):
        broken = onnx.ModelProto()
        broken.CopyFrom(model)
        broken.graph.initializer[0].CopyFrom(numpy_helper.from_array(
            numpy_helper.to_array(broken.graph.initializer[0]) * 1.5, broken.graph.initializer[0].name))
        return PassResult(broken, {})

    monkeypatch.setattr(Cleanup, "run", corrupt)
    out = tmp_path / "out.onnx"
    assert main([str(digits_assets.model), "--pass", "cleanup", "-o", str(out)]) == 1
    assert "is exact but changed the outputs" in capsys.readouterr().err
    assert not out.exists()


def test_recipe(digits_assets, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - cleanup: {fold_batchnorm: true}\ntolerance: 1e-5\n")
    assert main([str(digits_assets.model), "--recipe", str(recipe), "-o", str(tmp_path / "o.onnx")]) == 0


def test_import_optimizer_stays_light():
    code = "import sys, optimizer; print('torch' in sys.modules, 'tvm' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False False"
