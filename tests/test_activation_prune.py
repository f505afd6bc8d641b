"""activation-prune and activation_stats: masks hit their targets on held-out data, match a numpy reference of their
definition, stay standard ONNX (ORT, dynamic batch, TVM), and bad requests fail with clear messages."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.activation_stats import ProbeSession, activation_stats, zero_skip_macs
from optimizer.errors import PassError, UsageError
from optimizer.pipeline import optimize
from optimizer.verify import compare, run_ort, top1_accuracy
from passes import PassContext, get_pass
from passes.activation_prune import METADATA_KEY, select_sites

TOLERANCE_PT = 0.03


@pytest.fixture(scope="module")
def digits(digits_assets):
    calibration = dict(np.load(digits_assets.calibration))
    evaluation = dict(np.load(digits_assets.eval))
    return onnx.load(str(digits_assets.model)), calibration, evaluation


def prune(model, calibration=None, evaluation=None, **options):
    pass_ = get_pass("activation-prune").from_spec(options)
    ctx = PassContext(calibration=calibration, calibration_is_random=calibration is None, evaluation=evaluation)
    masked, report = pass_.run(model, ctx)
    onnx.checker.check_model(masked, full_check=True)
    return masked, report


def masks_of(model) -> list[dict]:
    return json.loads(next(p.value for p in model.metadata_props if p.key == METADATA_KEY))


def reference_mask(x, method, param, granularity="channel", score="mean", magnitude=False):
    """The mask definitions in numpy: x * (|x| > t); WTA keeps values >= each sample's k-th largest score."""
    source = np.abs(x) if magnitude else x
    if method == "threshold":
        return x * (source > param)
    n = x.shape[0]
    if granularity == "channel" and x.ndim >= 3:
        flat = source.reshape(n, x.shape[1], -1)
        scores = flat.mean(-1, dtype=np.float32) if score == "mean" else flat.max(-1)
        keep = scores >= np.sort(scores, axis=1)[:, -param][:, None]
        return x * keep.reshape(n, x.shape[1], *[1] * (x.ndim - 2))
    flat = source.reshape(n, -1)
    return x * (flat >= np.sort(flat, axis=1)[:, -param][:, None]).reshape(x.shape)


# --- must show 1: measured sparsity on held-out digits data tracks the target -----------------------------------

KINDS = {
    "threshold": {"method": "threshold"},
    "wta-element": {"method": "wta", "granularity": "element"},
    "wta-channel": {"method": "wta", "granularity": "channel"},
}


@pytest.mark.parametrize("target", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("kind", list(KINDS))
def test_heldout_sparsity_within_3pt_of_target(digits, kind, target):
    model, calibration, evaluation = digits
    masked, report = prune(model, calibration, sparsity=target, **KINDS[kind])
    tensors = [m["tensor"] for m in masks_of(masked)]
    assert len(tensors) == 4  # every ReLU of the digits CNN reaches a Conv or Gemm
    feeds = {"input": evaluation["input"]}
    rows = {
        r["tensor"]: r
        for r in activation_stats(masked, feeds, tensors=[*tensors, *(f"{t}/actmask/input" for t in tensors)])
    }
    for tensor, layer in zip(tensors, report["layers"], strict=True):
        natural = rows[f"{tensor}/actmask/input"]["sparsity"]
        measured = rows[tensor]["sparsity"]
        assert abs(measured - max(target, natural)) <= TOLERANCE_PT, (tensor, measured, natural)
        assert (
            layer["tensor"] == tensor
            and abs(layer["sparsity"] - max(target, layer["natural_sparsity"])) <= TOLERANCE_PT
        )


def test_global_scope_meets_total_target_with_uneven_layers(digits):
    model, calibration, evaluation = digits
    masked, report = prune(model, calibration, evaluation, sparsity=0.7, scope="global")
    assert abs(report["eval_activation_sparsity"] - 0.7) <= TOLERANCE_PT
    shares = [layer["sparsity"] for layer in report["layers"]]
    assert max(shares) - min(shares) > 0.1  # one cut across layers, not the same target everywhere


def test_report_counts_skipped_macs_and_accuracy(digits):
    model, calibration, evaluation = digits
    masked, report = prune(model, calibration, evaluation, sparsity=0.9, method="threshold")
    assert report["skipped_macs"] > report["skipped_macs_natural"] > 0
    assert report["skipped_macs"] < report["macs"]
    for layer in report["layers"]:
        assert layer["macs"] > 0 and layer["skipped_macs"] >= layer["skipped_macs_natural"]
        assert "accuracy_drop" in layer
    expected = 100 * (top1_accuracy(model, evaluation) - top1_accuracy(masked, evaluation))
    assert report["accuracy"]["drop"] == pytest.approx(expected, abs=1e-9)


def test_max_drop_backs_off_until_accuracy_holds(digits):
    model, calibration, evaluation = digits
    _, unlimited = prune(model, calibration, evaluation, sparsity=0.8, method="wta", granularity="channel")
    assert unlimited["accuracy"]["drop"] > 5.0
    masked, report = prune(
        model, calibration, evaluation, sparsity=0.8, method="wta", granularity="channel", max_drop=1.0
    )
    drop = 100 * (top1_accuracy(model, evaluation) - top1_accuracy(masked, evaluation))
    assert drop <= 1.0
    assert report["accuracy"]["drop"] == pytest.approx(drop, abs=1e-9)
    assert report["activation_sparsity"] < unlimited["activation_sparsity"]
    assert report["max_drop_search"][0]["target"] == 0.8


# --- must show 2: standard ONNX, matching the definition, any batch, TVM --------------------------------------


def tiny_model(activation="Relu", opset=17, rank=4, **attrs):
    """x -> activation -> Conv 3x3 (rank 4) or Gemm (rank 2) -> y, with fixed random weights."""
    rng = np.random.default_rng(1)
    if rank == 4:
        x_shape, y_shape, weight = ["N", 4, 6, 6], ["N", 3, 6, 6], rng.standard_normal((3, 4, 3, 3)).astype(np.float32)
        compute = helper.make_node("Conv", ["a", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    else:
        x_shape, y_shape, weight = ["N", 10], ["N", 5], rng.standard_normal((10, 5)).astype(np.float32)
        compute = helper.make_node("Gemm", ["a", "w"], ["y"], name="gemm")
    graph = helper.make_graph(
        [helper.make_node(activation, ["x"], ["a"], name="act", **attrs), compute],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


CASES = {
    "threshold-relu": ("Relu", 17, 4, {"method": "threshold", "threshold": 0.4}),
    "threshold-leakyrelu": ("LeakyRelu", 17, 4, {"method": "threshold", "threshold": 0.3}),
    "wta-channel-mean-opset17": ("Relu", 17, 4, {"method": "wta", "keep": 0.5, "granularity": "channel"}),
    "wta-channel-max-opset18": ("Relu", 18, 4,
                                {"method": "wta", "keep": 0.5, "score": "max", "granularity": "channel"}),
    "wta-channel-gelu-opset20": ("Gelu", 20, 4, {"method": "wta", "keep": 0.25, "granularity": "channel"}),
    "wta-element": ("Relu", 17, 4, {"method": "wta", "keep": 0.3, "granularity": "element"}),
    "wta-rank2": ("Relu", 17, 2, {"method": "wta", "keep": 0.4}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("batch", [1, 5])
def test_mask_matches_numpy_definition_at_any_batch(case, batch):
    activation, opset, rank, options = CASES[case]
    model = tiny_model(activation, opset, rank)
    shape = (batch, 4, 6, 6) if rank == 4 else (batch, 10)
    x = np.random.default_rng(batch).standard_normal(shape).astype(np.float32)
    masked, _ = prune(model, {"x": x}, **options)
    (entry,) = masks_of(masked)
    values = ProbeSession(masked, ["a/actmask/input", "a"]).run({"x": x})
    param = entry.get("threshold", entry.get("k"))
    granularity, score = options.get("granularity", "element"), options.get("score", "mean")
    expected = reference_mask(
        values["a/actmask/input"], options["method"], param, granularity, score, activation != "Relu"
    )
    np.testing.assert_array_equal(values["a"], expected)
    assert 0 < np.count_nonzero(values["a"]) < np.count_nonzero(values["a/actmask/input"])


def mixed_masks_model(model, calibration):
    """One model holding a threshold mask, channel WTA masks and an element WTA mask (one pass run each)."""
    names = [site.node for site in select_sites(model, get_pass("activation-prune")().options)[0]]
    pattern = "|".join(f"^{re.escape(name)}$" for name in names[1:3])
    masked, _ = prune(model, calibration, include=f"^{re.escape(names[0])}$", sparsity=0.6)
    masked, _ = prune(masked, calibration, include=pattern, method="wta", sparsity=0.7)
    masked, _ = prune(masked, calibration, include=f"^{re.escape(names[3])}$", method="wta", granularity="element")
    assert len(masks_of(masked)) == 4
    return masked


def test_masked_model_runs_on_tvm_like_ort(digits):
    pytest.importorskip("tvm")
    try:
        import runtimes.tvm  # noqa: F401
    except ImportError:
        pytest.skip("runtimes.tvm is not written yet")
    import runtimes

    model, calibration, evaluation = digits
    masked = mixed_masks_model(model, calibration)
    feeds = {"input": evaluation["input"][:8]}
    tvm_session = runtimes.load("tvm", masked, threads=1, batch=8, cache=False)
    difference = compare(run_ort(masked, feeds), tvm_session.run(feeds))
    assert difference["max_rel_err"] <= 1e-4


def test_pipeline_accepts_masks_and_dynamic_batch(digits):
    model, calibration, evaluation = digits
    masked, report = optimize(model, ["activation-prune:method=wta,granularity=element,sparsity=0.7"],
                              calibration=calibration, evaluation=evaluation)  # fmt: skip
    details = report["passes"][0]["details"]
    assert details["layers"] and report["passes"][0]["contract"] == "approximate"
    for batch in (1, 3):
        (logits,) = run_ort(masked, {"input": evaluation["input"][:batch]}).values()
        assert logits.shape == (batch, 10)


# --- must show 4: threshold 0 after ReLU is exact --------------------------------------------------------------


def test_threshold_zero_after_relu_leaves_outputs_unchanged(digits):
    model, calibration, evaluation = digits
    masked, report = prune(model, calibration, threshold=0.0)
    assert [n.op_type for n in masked.graph.node].count("Greater") == 4
    feeds = {"input": evaluation["input"]}
    np.testing.assert_array_equal(run_ort(masked, feeds)["logits"], run_ort(model, feeds)["logits"])
    for layer in report["layers"]:
        assert layer["sparsity"] == layer["natural_sparsity"]


# --- must show 5: bad inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [{"sparsity": "1.0"}, {"sparsity": "-0.1"}, {"sparsity": "1.5"},
                                  {"method": "wta", "threshold": "0.1"}, {"keep": "0.5"},
                                  {"threshold": "0.1", "max_drop": "1"}, {"include": "("}])  # fmt: skip
def test_bad_options_are_usage_errors(spec):
    with pytest.raises(UsageError, match="activation-prune"):
        get_pass("activation-prune").from_spec(spec)


def test_max_drop_without_labels_is_usage_error(digits):
    model, calibration, _ = digits
    with pytest.raises(UsageError, match="max_drop.*labels"):
        prune(model, calibration, max_drop=1.0)


def test_model_without_activation_to_mask_is_pass_error():
    add_only = tiny_model("Relu")
    add_only.graph.node[1].CopyFrom(helper.make_node("Add", ["a", "a"], ["y"], name="add"))
    with pytest.raises(PassError, match=r"no activation to mask \(act: feeds no Conv/Gemm/MatMul \(consumers: Add\)"):
        prune(add_only, {"x": np.ones((1, 4, 6, 6), np.float32)})
    no_activation = tiny_model("Identity")
    with pytest.raises(PassError, match="no activation to mask"):
        prune(no_activation, {"x": np.ones((1, 4, 6, 6), np.float32)})


def test_declined_candidates_are_reported():
    model = tiny_model("Relu")
    _, report = prune(model, {"x": np.ones((2, 4, 6, 6), np.float32)}, threshold=0.0, exclude="^nothing$")
    assert report["declined"] == []
    with pytest.raises(PassError, match="excluded by exclude"):
        prune(model, {"x": np.ones((2, 4, 6, 6), np.float32)}, exclude="^act$")


# --- activation_stats and zero-skip MACs ----------------------------------------------------------------------


def test_activation_stats_rows_match_numpy():
    model = tiny_model("Relu")
    x = np.random.default_rng(3).standard_normal((6, 4, 6, 6)).astype(np.float32)
    rows = {row["tensor"]: row for row in activation_stats(model, {"x": x, "labels": np.zeros(6)})}
    relu = np.maximum(x, 0)
    assert rows["a"] == {"tensor": "a", "node": "act", "op": "Relu", "shape": [6, 4, 6, 6],
                         "sparsity": float(np.mean(relu == 0)), "mean": pytest.approx(float(relu.mean())),
                         "max": pytest.approx(float(relu.max()))}  # fmt: skip
    assert rows["y"]["op"] == "Conv" and rows["y"]["shape"] == [6, 3, 6, 6]


def test_activation_stats_hides_mask_internals_of_a_masked_model():
    model = tiny_model("Relu")
    x = np.random.default_rng(4).standard_normal((6, 4, 6, 6)).astype(np.float32)
    masked, _ = prune(model, {"x": x}, method="wta", sparsity=0.7)
    rows = {row["tensor"]: row for row in activation_stats(masked, {"x": x})}
    assert set(rows) == {"a/actmask/input", "a", "y"}  # the pre-mask value, the masked value, the conv's output
    assert rows["a"]["op"] == "Mul" and rows["a"]["sparsity"] == pytest.approx(0.7, abs=0.03)
    assert rows["a/actmask/input"]["sparsity"] == float(np.mean(x <= 0))


def brute_force_conv_skips(x, weight_shape, strides, pads, dilations, group):
    """Count (output, weight tap) pairs that read an in-bounds zero of x, loop by loop."""
    n, channels, height, width = x.shape
    out_channels, group_channels, kh, kw = weight_shape
    out_h = (height + pads[0] + pads[2] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    out_w = (width + pads[1] + pads[3] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    per_group = out_channels // group
    count = 0
    for co in range(out_channels):
        first = (co // per_group) * group_channels
        for oh in range(out_h):
            for ow in range(out_w):
                for i in range(kh):
                    for j in range(kw):
                        h = oh * strides[0] - pads[0] + i * dilations[0]
                        w = ow * strides[1] - pads[1] + j * dilations[1]
                        if 0 <= h < height and 0 <= w < width:
                            count += np.count_nonzero(x[:, first : first + group_channels, h, w] == 0)
    return count / n, out_channels * out_h * out_w * group_channels * kh * kw


def test_zero_skip_macs_conv_matches_brute_force():
    rng = np.random.default_rng(4)
    x = np.maximum(rng.standard_normal((2, 4, 7, 6)), 0).astype(np.float32)
    weight = np.ones((6, 2, 3, 2), np.float32)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="c", strides=[2, 1], pads=[1, 0, 2, 1],
                            dilations=[2, 1], group=2)  # fmt: skip
    counted = zero_skip_macs(conv, 0, x, {"w": weight})
    skipped, macs = brute_force_conv_skips(x, weight.shape, [2, 1], [1, 0, 2, 1], [2, 1], 2)
    assert counted == {"macs": macs, "skipped_macs": skipped}


def test_zero_skip_macs_gemm_and_matmul():
    x = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]], np.float32)
    gemm = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    assert zero_skip_macs(gemm, 0, x, {"w": np.ones((5, 3), np.float32)}) == {"macs": 15.0, "skipped_macs": 7.5}
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"])
    assert zero_skip_macs(matmul, 0, x, {"w": np.ones((3, 4), np.float32)}) == {"macs": 12.0, "skipped_macs": 6.0}
    assert "note" in zero_skip_macs(matmul, 1, x, {"w": np.ones((3, 4), np.float32)})
