"""The mole pass (MoLe Aug-Conv) and the data provider's morphing: exact against ONNX Runtime's convolution."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.cli import main
from optimizer.errors import PassError, UsageError
from optimizer.morph import conv_matrix, load_key, make_key, morph
from optimizer.pipeline import optimize, write_artifacts
from optimizer.verify import run_ort
from passes import PassContext, get_pass
from passes.mole import first_conv


def conv_model(sample_shape, weight, *, bias=True, dynamic_spatial=False, **attrs) -> onnx.ModelProto:
    """input [N, *sample_shape] -> Conv -> Relu -> output."""
    shape = ["N", sample_shape[0], *(["S"] * (len(sample_shape) - 1) if dynamic_spatial else sample_shape[1:])]
    inputs = ["x", "w", "b"] if bias else ["x", "w"]
    nodes = [helper.make_node("Conv", inputs, ["c"], name="conv", **attrs),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    rng = np.random.default_rng(0)
    initializers = [numpy_helper.from_array(weight, "w")]
    if bias:
        initializers.append(numpy_helper.from_array(rng.standard_normal(weight.shape[0]).astype(np.float32), "b"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * (len(shape)))],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


GEOMETRIES = [
    pytest.param((3, 9, 9), (8, 3, 3, 3), dict(pads=[1, 1, 1, 1]), id="3x3-pad1"),
    pytest.param((2, 10, 7), (6, 2, 3, 2), dict(pads=[2, 0, 1, 1], strides=[2, 1], dilations=[1, 2]),
                 id="asymmetric-pads-stride-dilation"),
    pytest.param((4, 8, 8), (8, 2, 3, 3), dict(pads=[1, 1, 1, 1], group=2), id="grouped"),
    pytest.param((4, 6, 6), (4, 1, 3, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2], group=4), id="depthwise-same"),
    pytest.param((5, 20), (7, 5, 5), dict(pads=[2, 1], strides=[3]), id="conv1d"),
]


@pytest.mark.parametrize(("sample_shape", "weight_shape", "attrs"), GEOMETRIES)
def test_conv_matrix_is_the_convolution(sample_shape, weight_shape, attrs):
    weight = np.random.default_rng(1).standard_normal(weight_shape).astype(np.float32)
    model = conv_model(sample_shape, weight, bias=False, **attrs)
    conv = first_conv(model, "x")
    x = np.random.default_rng(2).standard_normal((3, *sample_shape)).astype(np.float32)
    padded = np.pad(x.astype(np.float64), [(0, 0), (0, 0), *conv.pads]).reshape(3, -1)
    expected = _conv_output(model, x)
    np.testing.assert_allclose((conv_matrix(conv).T @ padded.T).T, expected.reshape(3, -1), rtol=1e-5, atol=1e-5)


def _conv_output(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime's output of the Conv alone (the graph output moved to the Conv)."""
    graph = model.graph
    output = helper.make_tensor_value_info("c", TensorProto.FLOAT, [None] * x.ndim)
    only_conv = helper.make_model(helper.make_graph([graph.node[0]], "conv", graph.input, [output], graph.initializer),
                                  opset_imports=model.opset_import)
    return run_ort(only_conv, {"x": x})["c"]


@pytest.mark.parametrize(("sample_shape", "weight_shape", "attrs"), GEOMETRIES)
@pytest.mark.parametrize("spec", ["matrix=orthogonal", "matrix=uniform", "matrix=orthogonal,dtype=float64"])
def test_pass_is_exact_through_the_pipeline(tmp_path, sample_shape, weight_shape, attrs, spec):
    weight = np.random.default_rng(1).standard_normal(weight_shape).astype(np.float32)
    model = conv_model(sample_shape, weight, **attrs)
    key_path = tmp_path / "key.npz"
    x = np.random.default_rng(3).standard_normal((4, *sample_shape)).astype(np.float32)
    result, report = optimize(model, [f"mole:key_out={key_path},seed=5,{spec}"], calibration={"x": x})
    entry = report["passes"][0]
    assert entry["contract"] == "exact" and entry["verify"]["max_rel_err"] <= 1e-5
    key = load_key(key_path)
    assert [i.name for i in result.graph.input] == ["x_morphed"]
    assert json.loads(next(p.value for p in result.metadata_props if p.key == "sculpt.mole"))["key_sha256"] == \
        key.fingerprint() == entry["details"]["key_sha256"]
    # independently of the pipeline: morph fresh samples with the key file and compare with the original model
    fresh = np.random.default_rng(4).standard_normal((2, *sample_shape)).astype(np.float32)
    expected = run_ort(model, {"x": fresh})["y"]
    got = run_ort(result, {"x_morphed": morph(fresh, key)})["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_digits_cnn_keeps_its_accuracy_and_reports_costs(digits_assets, tmp_path):
    evaluation = dict(np.load(digits_assets.eval))
    calibration = dict(np.load(digits_assets.calibration))
    result, report = optimize(str(digits_assets.model), [f"mole:key_out={tmp_path / 'k.npz'},seed=0"],
                              calibration=calibration, evaluation=evaluation)
    assert report["eval"]["output"] == report["eval"]["input"] > 0.98
    details = report["passes"][0]["details"]
    # one 8x8 grey image padded by 1: 100 values sent instead of 64; a 100 x (16*8*8) matrix replaces the 3x3 conv
    assert details["morphed_length"] == 100 and details["transmission_overhead"] == pytest.approx(100 / 64 - 1)
    assert details["aug_conv_shape"] == [100, 1024] and details["conv_macs"] == 16 * 9 * 64
    assert details["model_macs_after"] - details["model_macs_before"] == 100 * 1024 - 16 * 9 * 64
    morphed = morph(evaluation["input"], load_key(tmp_path / "k.npz"))
    assert abs(np.corrcoef(morphed[:, :64].ravel(), evaluation["input"].reshape(len(morphed), -1).ravel())[0, 1]) < 0.2


def test_an_existing_key_rebuilds_the_same_layer(digits_assets, tmp_path):
    source = onnx.load(digits_assets.model)
    first = get_pass("mole").from_spec({"key_out": str(tmp_path / "k.npz"), "kappa": 4})
    result = first.run(source, PassContext())
    assert not (tmp_path / "k.npz").exists()  # the key is an artifact: the pipeline writes it, the pass does not
    write_artifacts(result.artifacts)
    built = result.model
    again, details = get_pass("mole").from_spec({"key": str(tmp_path / "k.npz")}).run(source, PassContext())
    aug = {t.name: numpy_helper.to_array(t) for t in built.graph.initializer}["mole/aug_conv"]
    np.testing.assert_array_equal(aug, {t.name: numpy_helper.to_array(t) for t in again.graph.initializer}[
        "mole/aug_conv"])
    assert details["kappa"] == 4 and details["aug_conv_density"] < 0.5  # block-diagonal M: block-sparse C_ac
    other = conv_model((1, 8, 8), np.ones((4, 1, 3, 3), np.float32))  # input named x, not input
    with pytest.raises(UsageError, match="morphs input 'input'"):
        get_pass("mole").from_spec({"key": str(tmp_path / "k.npz")}).run(other, PassContext())


def test_cli_morph_then_run_gives_the_original_logits(digits_assets, tmp_path):
    out, key, morphed, y, y_ref = (tmp_path / n for n in ("m.onnx", "k.npz", "em.npz", "y.npz", "yref.npz"))
    assert main([str(digits_assets.model), "--pass", f"mole:key_out={key}", "-o", str(out),
                 "--calibration", str(digits_assets.calibration)]) == 0
    assert main(["morph", str(key), "--input", str(digits_assets.eval), "--output", str(morphed)]) == 0
    assert set(np.load(morphed)) == {"input_morphed", "labels"}
    assert main(["run", str(out), "--input", str(morphed), "--output", str(y)]) == 0
    assert main(["run", str(digits_assets.model), "--input", str(digits_assets.eval), "--output", str(y_ref)]) == 0
    np.testing.assert_allclose(np.load(y)["logits"], np.load(y_ref)["logits"], rtol=1e-4, atol=1e-4)


def test_bad_options_and_unsupported_models(tmp_path):
    weight = np.ones((2, 1, 3, 3), np.float32)
    with pytest.raises(UsageError, match="key_out=FILE.npz"):
        get_pass("mole").from_spec({})
    with pytest.raises(UsageError, match="key_out=missing/k.npz: directory missing does not exist"):
        get_pass("mole").from_spec({"key_out": "missing/k.npz"})
    with pytest.raises(UsageError, match="kappa"):
        get_pass("mole").from_spec({"key_out": "k.npz", "kappa": 0})
    with pytest.raises(UsageError, match="positive divisor"):  # 1 x 6 x 6 padded by 1: 64 values
        get_pass("mole").from_spec({"key_out": str(tmp_path / "k.npz"), "kappa": 3}).run(
            conv_model((1, 6, 6), weight, pads=[1, 1, 1, 1]), PassContext())
    with pytest.raises(PassError, match="static sample shape"):
        get_pass("mole").from_spec({"key_out": str(tmp_path / "k.npz")}).run(
            conv_model((1, 6, 6), weight, dynamic_spatial=True), PassContext())
    two_readers = conv_model((1, 6, 6), weight)
    two_readers.graph.node.append(helper.make_node("Relu", ["x"], ["x2"], name="side"))
    with pytest.raises(PassError, match="must feed exactly one Conv"):
        get_pass("mole").from_spec({"key_out": str(tmp_path / "k.npz")}).run(two_readers, PassContext())
    assert not (tmp_path / "k.npz").exists()  # nothing is written when the pass fails


def test_key_matrix_kinds():
    orthogonal = make_key("x", (1, 4, 4), ((1, 1), (1, 1)), kind="orthogonal", seed=0)
    np.testing.assert_allclose(orthogonal.matrix() @ orthogonal.matrix().T, np.eye(36), atol=1e-12)
    uniform = make_key("x", (1, 4, 4), ((1, 1), (1, 1)), kind="uniform", kappa=2, seed=0)
    np.testing.assert_allclose(uniform.matrix() @ uniform.inverse(), np.eye(36), atol=1e-8)
    assert uniform.dtype == "float64" and orthogonal.dtype == "float32"
    assert not np.array_equal(make_key("x", (1, 4, 4), ((0, 0), (0, 0))).block,
                              make_key("x", (1, 4, 4), ((0, 0), (0, 0))).block)  # no seed: a fresh secret
