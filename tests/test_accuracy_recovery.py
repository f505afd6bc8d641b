"""structured-sparse with calibration data: least-squares recovery, data-aware criteria, keep_params/keep_macs.

The references are independent of the pass: ONNX Runtime runs the original and the pruned models, accuracy is
counted on held-out digits, and the im2col rows are checked against ORT's own Conv outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from recovery_models import NAMES, trained

from passes import PassContext
from passes.graph.activations import stream
from passes.graph.linear import LinearLayer
from passes.structured_sparse import StructuredSparse


def _run_pass(model, calibration=None, **options):
    ctx = PassContext(calibration=calibration, calibration_is_random=calibration is None)
    new, details = StructuredSparse(StructuredSparse.Options(**options)).run(model, ctx)
    onnx.checker.check_model(new, full_check=True)
    return new, details, ctx


def _outputs(model, feeds):
    chunks = list(stream(model, feeds, [model.graph.output[0].name]))
    return np.concatenate([c[model.graph.output[0].name] for c in chunks])


def _accuracy(model, evaluation) -> float:
    logits = _outputs(model, {"input": evaluation["input"]})
    return float(np.mean(logits.argmax(-1) == evaluation["labels"]))


def _conv_model(weights: list[tuple[np.ndarray, np.ndarray]], pads: int, shape) -> onnx.ModelProto:
    nodes, inits, x = [], [], "x"
    for i, (w, b) in enumerate(weights):
        out = "y" if i == len(weights) - 1 else f"h{i}"
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [out], name=f"conv{i}", pads=[pads] * 4))
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        x = out
    out_shape = ["n", weights[-1][0].shape[0], *shape[1:]]  # 3x3 kernels with pads 1 keep the spatial size
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *shape])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_lsq_reproduces_a_conv_pair_whose_removed_channels_are_linearly_redundant():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(8).astype(np.float32)
    mix = 0.05 * rng.standard_normal((2, 6))  # channels 6, 7 = small combinations of channels 0..5
    w1[6:] = np.einsum("ij,jklm->iklm", mix, w1[:6])
    b1[6:] = mix @ b1[:6]
    w2 = rng.standard_normal((4, 8, 3, 3)).astype(np.float32)
    model = _conv_model([(w1, b1), (w2, rng.standard_normal(4).astype(np.float32))], 1, (3, 10, 10))
    calibration = {"x": rng.standard_normal((32, 3, 10, 10)).astype(np.float32)}
    new, details, _ = _run_pass(model, calibration, ratio=0.25, criterion="l1")
    assert details["recover"] == "lsq"
    assert [g["kept"] for g in details["groups"] if g["status"] == "pruned"] == [[0, 1, 2, 3, 4, 5]]
    test = {"x": rng.standard_normal((4, 3, 10, 10)).astype(np.float32)}
    ref, out = _outputs(model, test), _outputs(new, test)
    assert np.abs(ref - out).max() / np.abs(ref).max() <= 1e-4
    plain, _, _ = _run_pass(model, calibration, ratio=0.25, criterion="l1", recover="none")
    assert np.abs(ref - _outputs(plain, test)).max() / np.abs(ref).max() > 1e-2  # the refit is what restores it
    (layer,) = details["recovery"]
    assert layer["error_after"] < 1e-5 < layer["error_before"]


CONVS = {  # (input shape, weight shape, attributes)
    "1d-dilated": ((2, 6, 20), (4, 6, 3), {"dilations": [2], "pads": [2, 2]}),
    "2d-strided": ((2, 4, 9, 9), (5, 4, 3, 3), {"strides": [2, 2], "pads": [1, 0, 1, 1]}),
    "2d-depthwise": ((2, 4, 7, 7), (8, 1, 3, 3), {"group": 4, "pads": [1, 1, 1, 1]}),
    "2d-same-upper": ((2, 3, 8, 8), (2, 3, 4, 4), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    "3d-grouped": ((1, 4, 5, 6, 6), (6, 2, 3, 1, 3), {"group": 2, "pads": [1, 0, 0, 1, 0, 2]}),
}


@pytest.mark.parametrize("case", CONVS)
def test_im2col_rows_times_weights_match_onnxruntime(case):
    x_shape, w_shape, attrs = CONVS[case]
    rng = np.random.default_rng(1)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal(x_shape).astype(np.float32)
    y = _outputs(model, {"x": x})
    layer = LinearLayer("conv", "Conv", "x", "y", "w", "b", dict(attrs), w, b)
    z = layer.rows(x)
    fitted = np.einsum("rgd,gdm->rgm", z, layer.weights()[:, :-1]) + layer.weights()[:, -1][None]
    np.testing.assert_allclose(fitted, layer.targets(y), rtol=1e-4, atol=1e-4)
    assert np.allclose(layer.write(layer.weights())["w"], w)


@pytest.mark.parametrize("name", NAMES)
def test_keep_params_with_recovery_keeps_accuracy_where_plain_l1_loses_it(name, torch_one_thread):
    model, calibration, evaluation = trained(name)
    base = _accuracy(model, evaluation)
    plain, plain_details, _ = _run_pass(model, calibration, keep_params=0.6, criterion="l1", recover="none")
    recovered, details, _ = _run_pass(model, calibration, keep_params=0.6)
    assert details["criterion"] == "reconstruction" and details["recover"] == "lsq"
    for d in (plain_details, details):
        assert abs(d["summary"]["weights_kept"] - 0.6) <= 0.02
        assert d["summary"]["budget"]["reached"] == d["summary"]["weights_kept"]
    assert base >= 0.95
    assert base - _accuracy(plain, evaluation) >= 0.05
    assert base - _accuracy(recovered, evaluation) <= 0.01
    assert set(details["summary"]["phases"]) == {"analysis", "selection", "recovery"}
    assert all(r["error_after"] <= r["error_before"] for r in details["recovery"] if "skipped" not in r)


def test_keep_macs_lands_on_the_digits_cnn(digits_assets):
    model = onnx.load(digits_assets.model)
    calibration = {"input": np.load(digits_assets.calibration)["input"][:64]}
    _, details, _ = _run_pass(model, calibration, keep_macs=0.5)
    budget = details["summary"]["budget"]
    assert budget["metric"] == "macs" and 0.48 <= budget["reached"] <= 0.52
    assert budget["reached"] == details["summary"]["macs_kept"]


def test_keep_macs_lands_on_a_resnet18_graph(torch_one_thread):
    import torch
    from sparse_families import ResNetLike, export

    torch.manual_seed(0)
    net = ResNetLike(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), classes=1000, imagenet_stem=True).eval()
    model = export(net, (1, 3, 224, 224))
    new, details, _ = _run_pass(model, keep_macs=0.5)
    assert details["criterion"] == "l1" and details["recover"] == "none"  # no calibration data
    assert 0.48 <= details["summary"]["macs_kept"] <= 0.52
    from optimizer.report import model_stats

    assert abs(model_stats(new)["macs"] / model_stats(model)["macs"] - details["summary"]["macs_kept"]) < 1e-3


def _cli(args, capsys):
    from optimizer.cli import main

    code = main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    return code, errors, err


@pytest.mark.parametrize("spec, message", [
    ("keep_params=0", "option keep_params=0.0 must be a fraction in (0, 1]"),
    ("keep_params=1.5", "option keep_params=1.5 must be a fraction in (0, 1]"),
    ("keep_macs=-1", "option keep_macs=-1.0 must be a fraction in (0, 1]"),
    ("recover=lsq", "option recover=lsq needs calibration data"),
    ("criterion=activation", "option criterion=activation needs calibration data"),
])
def test_bad_budget_and_recovery_options_exit_2_with_one_line(spec, message, digits_assets, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code, errors, err = _cli([str(digits_assets.model), "--pass", f"structured-sparse:{spec}", "-o", str(out)], capsys)
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not out.exists()


def test_too_few_calibration_rows_fall_back_to_ridge_with_a_warning(digits_assets, tmp_path, capsys):
    few = tmp_path / "few.npz"
    np.savez(few, input=np.load(digits_assets.calibration)["input"][:16])
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, errors, err = _cli([str(digits_assets.model), "--pass", "structured-sparse:keep_params=0.7", "-o", str(out),
                              "--calibration", str(few), "--report", str(report)], capsys)
    assert code == 0 and not errors
    text = " ".join(err.split())  # the console wraps long warnings
    assert "16 calibration rows for" in text and "stronger ridge" in text
    import json

    details = json.loads(report.read_text())["passes"][0]["details"]
    gemm = [r for r in details["recovery"] if r["op"] == "Gemm" and r["rows"] < r["unknowns"]]
    assert gemm and all(r["ridge"] >= 1e-2 and r["error_after"] <= r["error_before"] for r in gemm)
