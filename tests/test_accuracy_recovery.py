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


def test_keep_macs_lands_when_the_spatial_dims_are_dynamic(digits_assets):
    """A recognizer's width is dynamic: the budget counts MACs at the calibration data's sizes (counted at the
    graph's own shapes every Conv would weigh as if its output were 1x1, and the cut would overshoot)."""
    from optimizer.report import model_stats

    model = onnx.load(digits_assets.model)
    for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], ("height", "width"), strict=True):
        dim.ClearField("dim_value")
        dim.dim_param = name
    calibration = {"input": np.load(digits_assets.calibration)["input"][:64]}
    new, details, _ = _run_pass(model, calibration, keep_macs=0.5)
    reached = details["summary"]["budget"]["reached"]
    assert 0.48 <= reached <= 0.52
    sizes = {"input": [1, *calibration["input"].shape[1:]]}
    assert abs(model_stats(new, input_shapes=sizes)["macs"] / model_stats(model, input_shapes=sizes)["macs"]
               - reached) < 0.01


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


def _linear_pair(kind: str, rng) -> tuple[onnx.ModelProto, dict]:
    """x[n, 6] -> (Gemm transB=1 | MatMul + Add bias) -> 8 features whose last two are small linear combinations
    of the others -> a second layer of the same kind -> y[n, 4]."""
    w1 = rng.standard_normal((6, 8)).astype(np.float32)
    b1 = rng.standard_normal(8).astype(np.float32)
    mix = 0.05 * rng.standard_normal((6, 2))
    w1[:, 6:] = w1[:, :6] @ mix
    b1[6:] = b1[:6] @ mix
    w2 = rng.standard_normal((8, 4)).astype(np.float32)
    b2 = rng.standard_normal(4).astype(np.float32)
    if kind == "gemm":
        nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
                 helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], name="fc2", transB=1)]
        inits = [(w1.T.copy(), "w1"), (b1, "b1"), (w2.T.copy(), "w2"), (b2, "b2")]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
                 helper.make_node("Add", ["b1", "m1"], ["h"], name="bias1"),
                 helper.make_node("MatMul", ["h", "w2"], ["m2"], name="fc2"),
                 helper.make_node("Add", ["m2", "b2"], ["y"], name="bias2")]
        inits = [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [numpy_helper.from_array(a, n) for a, n in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, {"x": rng.standard_normal((64, 6)).astype(np.float32)}


@pytest.mark.parametrize("kind", ["gemm", "matmul"])
def test_lsq_reproduces_gemm_and_matmul_consumers_of_redundant_features(kind):
    rng = np.random.default_rng(2)
    model, calibration = _linear_pair(kind, rng)
    new, details, _ = _run_pass(model, calibration, ratio=0.25, criterion="l1")
    assert [g["kept"] for g in details["groups"] if g["status"] == "pruned"] == [[0, 1, 2, 3, 4, 5]]
    test = {"x": rng.standard_normal((16, 6)).astype(np.float32)}
    ref, out = _outputs(model, test), _outputs(new, test)
    assert np.abs(ref - out).max() / np.abs(ref).max() <= 1e-4
    assert [r["node"] for r in details["recovery"]] == ["fc2"]


def test_max_drop_takes_the_largest_cut_within_the_points(digits_assets):
    model = onnx.load(digits_assets.model)
    calibration = {"input": np.load(digits_assets.calibration)["input"][:128]}
    evaluation = dict(np.load(digits_assets.eval))
    ctx = PassContext(calibration=calibration, calibration_is_random=False, evaluation=evaluation)
    new, details = StructuredSparse(StructuredSparse.Options(max_drop=1.0)).run(model, ctx)
    tried = details["max_drop"]["tried"]
    assert len(tried) >= 2
    ok = [t for t in tried if t["drop_points"] <= 1.0]
    assert ok and all(t["drop_points"] > 1.0 for t in tried if t["keep_params"] < min(o["keep_params"] for o in ok))
    chosen = min(ok, key=lambda t: t["keep_params"])
    base = _accuracy(model, evaluation)
    assert abs(100 * (base - _accuracy(new, evaluation)) - chosen["drop_points"]) < 1e-3  # rounded to 4 places
    assert details["summary"]["weights_kept"] == chosen["weights_kept"]


def test_max_drop_without_labels_is_a_usage_error(digits_assets, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code, errors, _ = _cli([str(digits_assets.model), "--pass", "structured-sparse:max_drop=1", "-o", str(out),
                            "--calibration", str(digits_assets.calibration)], capsys)
    assert code == 2 and len(errors) == 1 and "max_drop needs --eval data with labels" in errors[0]


def test_sensitivity_runs_the_pass_algorithm_with_recovery(digits_assets):
    from optimizer.sensitivity import sensitivity

    model = onnx.load(digits_assets.model)
    evaluation = dict(np.load(digits_assets.eval))
    calibration = {"input": np.load(digits_assets.calibration)["input"][:128]}
    plain = sensitivity(model, evaluation, ratios=(0.75,))
    refit = sensitivity(model, evaluation, ratios=(0.75,), calibration=calibration)
    assert (plain["criterion"], plain["recover"]) == ("l1", "none")
    assert (refit["criterion"], refit["recover"]) == ("reconstruction", "lsq")
    drops = {name: {r["name"]: r["ratios"]["0.75"]["drop"] for r in result["groups"]}
             for name, result in (("plain", plain), ("refit", refit))}
    assert drops["plain"].keys() == drops["refit"].keys()
    assert sum(drops["refit"].values()) < sum(drops["plain"].values())


def test_both_budgets_are_met_together(digits_assets):
    model = onnx.load(digits_assets.model)
    calibration = {"input": np.load(digits_assets.calibration)["input"][:64]}
    new, details, _ = _run_pass(model, calibration, keep_params=0.9, keep_macs=0.6)
    summary = details["summary"]
    assert [b["metric"] for b in summary["budgets"]] == ["params", "macs"]
    assert summary["macs_kept"] <= 0.62 and summary["weights_kept"] <= 0.92  # the tighter one binds, both hold
    from optimizer.report import model_stats

    shapes = {"input": [1, *calibration["input"].shape[1:]]}
    counted = model_stats(new, input_shapes=shapes)["macs"] / model_stats(model, input_shapes=shapes)["macs"]
    assert abs(counted - summary["macs_kept"]) < 1e-3


def test_max_ratio_caps_every_group_cut(digits_assets):
    model = onnx.load(digits_assets.model)
    calibration = {"input": np.load(digits_assets.calibration)["input"][:64]}
    _, details, _ = _run_pass(model, calibration, keep_macs=0.5, max_ratio=0.5)
    for group in details["groups"]:
        assert group["channels_after"] >= group["channels_before"] - int(0.5 * group["channels_before"])


def _wide_resnet():
    import torch
    from sparse_families import ResNetLike, export

    torch.manual_seed(0)
    net = ResNetLike(widths=(32, 64), blocks=(1, 1), classes=10, imagenet_stem=False).eval()
    return export(net, (1, 3, 16, 16))


def test_round_to_auto_keeps_conv_widths_aligned_and_round_to_1_does_not(torch_one_thread):
    model = _wide_resnet()
    _, auto, _ = _run_pass(model, ratio=0.3)
    _, free, _ = _run_pass(model, ratio=0.3, round_to=1)
    for a, f in zip(auto["groups"], free["groups"], strict=True):
        if a["status"] != "pruned":
            continue
        assert a["channels_after"] % 8 == 0 and a["channels_after"] >= f["channels_after"]
        assert f["channels_after"] == a["channels_before"] - int(0.3 * a["channels_before"])  # 32 -> 23, 64 -> 45


def test_output_gain_sees_a_branch_the_outputs_scale_down():
    """Two identical branches, one multiplied by 1e-3 before the sum: the same local error reaches the output
    1e6 times weaker (squared), and the measured gains say so."""
    from passes.graph.data_scores import activation_scores, capture
    from passes.graph.groups import analyze
    from passes.graph.output_gain import output_gains
    from passes.structured_sparse import prepare

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for branch, scale in (("a", 1.0), ("b", 1e-3)):
        w1, w2 = rng.standard_normal((8, 4, 1, 1)), rng.standard_normal((4, 8, 1, 1))
        inits += [numpy_helper.from_array(w1.astype(np.float32), f"w1{branch}"),
                  numpy_helper.from_array(w2.astype(np.float32), f"w2{branch}"),
                  numpy_helper.from_array(np.float32(scale), f"s{branch}")]
        nodes += [helper.make_node("Conv", ["x", f"w1{branch}"], [f"h{branch}"], name=f"c1{branch}"),
                  helper.make_node("Relu", [f"h{branch}"], [f"r{branch}"]),
                  helper.make_node("Conv", [f"r{branch}", f"w2{branch}"], [f"y{branch}"], name=f"c2{branch}"),
                  helper.make_node("Mul", [f"y{branch}", f"s{branch}"], [f"z{branch}"])]
    nodes.append(helper.make_node("Add", ["za", "zb"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 6, 6])], inits)
    model = prepare(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    feeds = {"x": rng.standard_normal((16, 4, 6, 6)).astype(np.float32)}
    analysis = analyze(model)
    stats, _, _ = capture(analysis, model, feeds, False)
    scores = {gid: s for gid, (s, _, _) in activation_scores(analysis, stats).items()}
    gains = output_gains(model, stats, scores, feeds)
    by_producer = {analysis.groups[gid].name: gain for gid, gain in gains.items()}
    assert set(by_producer) == {"c1a", "c1b"}
    assert by_producer["c1b"] < 1e-4 * by_producer["c1a"]


def test_a_weights_budget_met_from_a_light_compute_head_warns_that_it_will_not_run_faster():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.standard_normal((512, 8)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((4, 512)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["hr"], name="relu1"),
             helper.make_node("Gemm", ["hr", "w2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, details, ctx = _run_pass(model, keep_params=0.7, exclude="^conv$")  # the cut must come from the head
    summary = details["summary"]
    assert summary["weights_kept"] <= 0.72 and summary["macs_kept"] >= 0.95
    assert any("will run about as fast as before; add keep_macs" in w for w in ctx.warnings)
    _, _, ctx = _run_pass(model, keep_params=0.7, keep_macs=0.7)
    assert not any("as fast as before" in w for w in ctx.warnings)


def test_refitted_weights_carry_no_subnormal_floats():
    """x86 multiplies by subnormals dozens of times slower (a refitted PP-OCRv4 rec Conv ran 40 ms, not 0.7):
    LinearLayer.write flushes them to zero and leaves every normal value as it is."""
    from passes.graph.linear import flush_subnormals

    values = np.array([1e-40, -3e-39, 1.2e-38, 0.5, -2.0, 0.0], dtype=np.float32)
    flushed = flush_subnormals(values)
    assert flushed.dtype == np.float32
    assert flushed.tolist() == [0.0, 0.0, np.float32(1.2e-38).item(), 0.5, -2.0, 0.0]
    assert flush_subnormals(np.array([3, 4], dtype=np.int64)).tolist() == [3, 4]


def test_cached_targets_refit_exactly_as_rerunning_the_original(monkeypatch):
    """The original model's targets come from one run, cached across stages up to TARGET_CACHE_BYTES; layers past
    the cap rerun the original per stage, and a capture whose outputs pass CAPTURE_CHUNK_BYTES is split into
    several runs. Every path samples the same rows, so the refits are identical."""
    from passes.graph import recovery

    rng = np.random.default_rng(3)
    weights = [(rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32) / 4,
                rng.standard_normal(c_out).astype(np.float32)) for c_in, c_out in ((3, 8), (8, 8), (8, 4))]
    model = _conv_model(weights, 1, (3, 9, 9))
    calibration = {"x": rng.standard_normal((20, 3, 9, 9)).astype(np.float32)}

    def refit(limit, capture=1 << 28):
        monkeypatch.setattr(recovery, "TARGET_CACHE_BYTES", limit)
        monkeypatch.setattr(recovery, "CAPTURE_CHUNK_BYTES", capture)
        new, details, _ = _run_pass(model, calibration, ratio=0.25, criterion="l1")
        assert [layer["node"] for layer in details["recovery"]] == ["conv1", "conv2"]
        assert all(layer["error_after"] < layer["error_before"] for layer in details["recovery"])  # refitted
        return {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}

    cached, rerun, one_layer_per_run = refit(1 << 30), refit(0), refit(1 << 30, capture=1)
    assert cached.keys() == rerun.keys() == one_layer_per_run.keys()
    for name, value in cached.items():
        np.testing.assert_array_equal(value, rerun[name])
        np.testing.assert_array_equal(value, one_layer_per_run[name])
