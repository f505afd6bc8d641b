"""The reram runtime on ONNX models: QDQ / integer / float layers against int64 numpy and ONNX Runtime, the cost
model's hand figures, options, the bit-slice plan and the CLI."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_reram_helpers import int_conv, qdq_model

import runtimes
from optimizer.cli import main
from optimizer.errors import RuntimeFailure, UsageError
from runtimes.reram.config import parse_options


def run(model, x, **options):
    session = runtimes.load("reram", model, **options)
    return session.run({"x": x})["y"], session.describe()


def ort_run(model, x):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options).run(None, {"x": x})[0]


def codes_as_input(rng, shape, dtype, zero_point):
    info = np.iinfo(dtype)
    codes = rng.integers(info.min, info.max + 1, shape)
    codes.flat[0] = info.max
    return codes, (codes - zero_point).astype(np.float32)


# --- exactness: integer results equal int64 numpy bit for bit --------------------------------------------------------

@pytest.mark.parametrize("dtype,zero_point", [(np.uint8, 0), (np.uint8, 37), (np.int8, -5)], ids=str)
@pytest.mark.parametrize("k,m", [(300, 70), (1, 4), (129, 131)], ids=str)
def test_qdq_gemm_and_matmul_are_bit_exact(dtype, zero_point, k, m):
    rng = np.random.default_rng(k + m)
    w = rng.integers(-127, 128, (k, m))
    codes, x = codes_as_input(rng, (5, k), dtype, zero_point)
    expected = (codes - zero_point) @ w
    for model in (qdq_model("Gemm", w, x_shape=[5, k], x_dtype=dtype, x_zero_point=zero_point),
                  qdq_model("MatMul", w, x_shape=[5, k], x_dtype=dtype, x_zero_point=zero_point),
                  qdq_model("Gemm", w.T.copy(), x_shape=[5, k], x_dtype=dtype, x_zero_point=zero_point,
                            attrs={"transB": 1}, w_axis=0)):
        y, described = run(model, x, adc_bits=9)
        assert np.array_equal(y.astype(np.int64), expected)
        assert described["saturated_conversions"] == 0


def test_matmul_with_batched_activations():
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (20, 7))
    codes, x = codes_as_input(rng, (2, 3, 20), np.uint8, 3)
    y, _ = run(qdq_model("MatMul", w, x_shape=[2, 3, 20], x_zero_point=3), x)
    assert y.shape == (2, 3, 7) and np.array_equal(y.astype(np.int64), (codes - 3) @ w)


CONVS = {
    "grouped-stride-pad-dilation": dict(c=4, m=6, k=(3, 3), group=2, strides=[2, 1], pads=[1, 0, 2, 1],
                                        dilations=[2, 1], dtype=np.uint8, zp=7),
    "depthwise": dict(c=5, m=5, k=(3, 3), group=5, strides=[1, 1], pads=[1, 1, 1, 1], dilations=[2, 2],
                      dtype=np.int8, zp=-3),
    "k144-m130": dict(c=16, m=130, k=(3, 3), group=1, strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1],
                      dtype=np.uint8, zp=0),
    "pointwise-k1": dict(c=1, m=3, k=(1, 1), group=1, strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1],
                         dtype=np.int8, zp=4),
    "same-upper": dict(c=3, m=4, k=(3, 3), group=1, strides=[2, 2], pads=None, dilations=[1, 1],
                       dtype=np.uint8, zp=1, auto_pad="SAME_UPPER", ref_pads=[0, 0, 1, 1]),
}


@pytest.mark.parametrize("case", list(CONVS), ids=str)
def test_qdq_conv_is_bit_exact(case):
    p = CONVS[case]
    rng = np.random.default_rng(len(case))
    w = rng.integers(-127, 128, (p["m"], p["c"] // p["group"], *p["k"]))
    codes, x = codes_as_input(rng, (2, p["c"], 8, 8), p["dtype"], p["zp"])
    attrs = {"group": p["group"], "strides": p["strides"], "dilations": p["dilations"], "kernel_shape": list(p["k"])}
    attrs.update({"pads": p["pads"]} if p["pads"] else {"auto_pad": p["auto_pad"]})
    model = qdq_model("Conv", w, x_shape=[2, p["c"], 8, 8], x_dtype=p["dtype"], x_zero_point=p["zp"], attrs=attrs)
    expected = int_conv(codes - p["zp"], w, stride=p["strides"], pads=p["pads"] or p["ref_pads"],
                        dilation=p["dilations"], groups=p["group"], pad_value=0)
    y, described = run(model, x, adc_bits=9)
    assert np.array_equal(y.astype(np.int64), expected)
    assert described["saturated_conversions"] == 0
    assert described["layers"][0]["groups"] == p["group"]


def test_real_scales_and_bias_match_onnx_runtime():
    rng = np.random.default_rng(1)
    w = rng.integers(-127, 128, (8, 3, 3, 3))
    model = qdq_model("Conv", w, x_shape=[2, 3, 10, 10], x_zero_point=128, x_scale=0.0173,
                      w_scale=rng.uniform(0.001, 0.01, 8).astype(np.float32), bias=rng.normal(size=8),
                      attrs={"pads": [1, 1, 1, 1]}, opset=13)
    x = rng.normal(size=(2, 3, 10, 10)).astype(np.float32)
    y, _ = run(model, x, adc_bits=9)
    np.testing.assert_allclose(y, ort_run(model, x), rtol=1e-5, atol=1e-5)


def integer_model(nodes, inits, x_type, y_type, rank=2):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", x_type, [None] * rank)],
                              [helper.make_tensor_value_info("y", y_type, [None] * rank)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_matmul_integer_and_conv_integer_are_exact():
    rng = np.random.default_rng(2)
    b = rng.integers(-128, 128, (40, 6)).astype(np.int8)
    b_zp = rng.integers(-3, 4, 6).astype(np.int8)
    a = rng.integers(0, 256, (4, 40)).astype(np.uint8)
    matmul = integer_model(
        [helper.make_node("MatMulInteger", ["x", "b", "az", "bz"], ["y"])],
        [numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.array(9, np.uint8), "az"),
         numpy_helper.from_array(b_zp, "bz")], TensorProto.UINT8, TensorProto.INT32)
    y, _ = run(matmul, a)
    expected = (a.astype(np.int64) - 9) @ (b.astype(np.int64) - b_zp)
    assert y.dtype == np.int32 and np.array_equal(y, expected)

    w = rng.integers(0, 256, (4, 2, 3, 3)).astype(np.uint8)
    conv = integer_model(
        [helper.make_node("ConvInteger", ["x", "w", "xz", "wz"], ["y"], pads=[1, 1, 1, 1])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(5, np.uint8), "xz"),
         numpy_helper.from_array(np.array(120, np.uint8), "wz")], TensorProto.UINT8, TensorProto.INT32, rank=4)
    x = rng.integers(0, 256, (1, 2, 6, 6)).astype(np.uint8)
    y, _ = run(conv, x)
    expected = int_conv(x.astype(np.int64) - 5, w.astype(np.int64) - 120, stride=[1, 1], pads=[1, 1, 1, 1],
                        dilation=[1, 1], groups=1, pad_value=0)
    assert np.array_equal(y, expected) and np.array_equal(y, ort_run(conv, x))


def test_qlinear_matmul_requantizes_the_exact_accumulator():
    rng = np.random.default_rng(4)
    b = rng.integers(-127, 128, (30, 5)).astype(np.int8)
    inits = [numpy_helper.from_array(np.array(v, dtype=d), n) for n, v, d in (
        ("as", 0.02, np.float32), ("az", 10, np.uint8), ("bs", 0.01, np.float32), ("bz", 0, np.int8),
        ("ys", 0.5, np.float32), ("yz", 128, np.uint8))] + [numpy_helper.from_array(b, "b")]
    model = integer_model([helper.make_node("QLinearMatMul", ["x", "as", "az", "b", "bs", "bz", "ys", "yz"], ["y"])],
                          inits, TensorProto.UINT8, TensorProto.UINT8)
    a = rng.integers(0, 256, (6, 30)).astype(np.uint8)
    y, _ = run(model, a)
    accumulator = (a.astype(np.int64) - 10) @ b.astype(np.int64)
    expected = np.clip(np.rint(accumulator * (0.02 * 0.01 / 0.5)) + 128, 0, 255)
    assert y.dtype == np.uint8 and np.array_equal(y, expected)


def test_float_model_is_quantized_internally_and_stays_close_to_onnx_runtime():
    rng = np.random.default_rng(6)
    w = rng.normal(size=(3, 12, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("Gemm", ["f", "fc", "bias"], ["y"], transB=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 5])],
        [numpy_helper.from_array(w.transpose(1, 0, 2, 3).copy(), "w"),
         numpy_helper.from_array(rng.normal(size=(5, 432)).astype(np.float32), "fc"),
         numpy_helper.from_array(rng.normal(size=5).astype(np.float32), "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    calibration = {"x": rng.normal(size=(32, 3, 6, 6)).astype(np.float32)}
    x = rng.normal(size=(8, 3, 6, 6)).astype(np.float32)
    y, described = run(model, x, calibration=calibration)
    reference = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert np.abs(y - reference).max() < 0.02 * np.abs(reference).max()
    assert [layer["weights"] for layer in described["layers"]] == ["float", "float"]
    assert described["calibration"] == "calibration data"
    assert described["layers"][1]["input_zero_point"] == 0  # after ReLU the range starts at 0


def test_matmul_of_two_activations_runs_digitally_and_is_reported():
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"], name="attention")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    x = np.arange(9, dtype=np.float32).reshape(3, 3)
    y, described = run(model, x)
    np.testing.assert_array_equal(y, x @ x)
    assert described["digital"]["declined"][0]["node"] == "attention" and described["arrays"] == 0


def test_missing_input_is_a_runtime_failure():
    session = runtimes.load("reram", qdq_model("MatMul", np.ones((4, 2)), x_shape=[1, 4]))
    with pytest.raises(RuntimeFailure, match="missing input 'x'"):
        session.run({"other": np.zeros((1, 4), np.float32)})


# --- saturation and cost hand figures -------------------------------------------------------------------------------

def hand_case_model():
    return qdq_model("Gemm", np.full((128, 1), 127), x_shape=[1, 128])


def test_saturation_hand_case_through_the_runtime():
    x = np.full((1, 128), 255, np.float32)
    assert run(hand_case_model(), x, adc_bits=9)[0][0, 0] == 4_145_280
    y, described = run(hand_case_model(), x, adc_bits="8")
    assert y[0, 0] == 3_454_485
    assert (described["adc_conversions"], described["saturated_conversions"]) == (64, 24)


def test_cost_of_one_fully_driven_128x128_gemm():
    w = np.random.default_rng(0).integers(-127, 128, (128, 128))
    _, described = run(qdq_model("Gemm", w, x_shape=[1, 128]), np.full((1, 128), 255, np.float32))
    layer = described["layers"][0]
    assert layer["array_reads"] == 64 and described["arrays"] == 8
    assert described["energy_pj"]["total"] == pytest.approx(64 * 282.625)
    assert described["energy_pj"]["total"] == pytest.approx(18_088)
    assert described["adc_energy_share"] == pytest.approx(0.708, abs=5e-4)
    assert described["pj_per_mac"] == pytest.approx(1.104, abs=5e-4)
    assert described["tops_per_w"] == pytest.approx(1.81, abs=5e-3)
    assert described["latency_ns"] == 8 * 100
    per_array = 25e-6 + 128 * 0.166e-6 + 128 * 0.039e-6 + 30e-6 + 0.0012
    assert described["area_mm2"] == pytest.approx(8 * per_array)


def test_zero_inputs_drive_no_rows():
    w = np.ones((128, 128), np.int64)
    _, described = run(qdq_model("Gemm", w, x_shape=[1, 128]), np.zeros((1, 128), np.float32))
    assert described["energy_pj"]["dac"] == 0
    assert described["energy_pj"]["array"] == 64 * 30


# --- options, the bit-slice plan and the CLI ------------------------------------------------------------------------

def test_options_parse_strings_yaml_and_reject_unknown_keys(tmp_path):
    options = parse_options({"adc_bits": "3/3/3/1", "stuck_at": "0.001/0.002", "on_off": "inf", "rows": "64"})
    assert options.adc_bits == (3, 3, 3, 1) and options.stuck_at == (0.001, 0.002) and options.rows == 64
    config = tmp_path / "reram.yaml"
    config.write_text("reram:\n  adc_bits: [4, 4, 4, 2]\n  sign: offset\n")
    options = parse_options({"config": str(config), "sign": "differential"})
    assert options.adc_bits == (4, 4, 4, 2) and options.sign == "differential"
    with pytest.raises(UsageError, match="unknown option 'adc_bit'"):
        parse_options({"adc_bit": 3})
    with pytest.raises(UsageError, match="adc_range='fine'"):
        parse_options({"adc_range": "fine"})
    with pytest.raises(UsageError, match="adc_bits='3/x'"):
        parse_options({"adc_bits": "3/x"})


def with_metadata(model, key, value):
    model.metadata_props.add(key=key, value=json.dumps(value))
    return model


def test_bitslice_plan_sets_per_slice_adc_bits_unless_options_override():
    x = np.full((1, 128), 255, np.float32)
    planned = with_metadata(hand_case_model(), "sculpt.bitslice", [{"node": "layer", "adc_bits": [9, 9, 9, 8]}])
    _, described = run(planned, x)
    assert described["layers"][0]["adc_bits"] == [9, 9, 9, 8]
    assert described["layers"][0]["adc_bits_source"] == "plan" and described["saturated_conversions"] == 0
    _, described = run(planned, x, adc_bits=8)
    assert described["layers"][0]["adc_bits_source"] == "options" and described["saturated_conversions"] == 24
    wrong = with_metadata(hand_case_model(), "sculpt.bitslice", {"layers": [{"node": "layer", "adc_bits": [3, 1]}]})
    with pytest.raises(UsageError, match="4 weight slices but the model's bit-slice plan gives 2"):
        runtimes.load("reram", wrong)


def test_plan_from_the_bit_slice_pass_and_declared_weight_bits():
    from passes import PassContext, get_pass

    rng = np.random.default_rng(8)
    w = rng.integers(-7, 8, (200, 20))
    model = with_metadata(qdq_model("MatMul", w, x_shape=[4, 200]), "sculpt.quant",
                          {"weights": {"wq": {"bits": 4}}})
    planned, _ = get_pass("bit-slice").from_spec({}).run(model, PassContext())
    x = rng.integers(0, 256, (4, 200)).astype(np.float32)
    y, described = run(planned, x)
    layer = described["layers"][0]
    assert layer["slices"] == 2 and layer["adc_bits_source"] == "plan"
    assert layer["adc_bits"] == layer["adc_bits_needed"] and described["saturated_conversions"] == 0
    assert np.array_equal(y.astype(np.int64), x.astype(np.int64) @ w)


def test_cli_run_reports_the_saturation_hand_case(tmp_path):
    model_path, inputs = tmp_path / "gemm.onnx", tmp_path / "x.npz"
    onnx.save(hand_case_model(), model_path)
    np.savez(inputs, x=np.full((1, 128), 255, np.float32))
    config = tmp_path / "reram.yaml"
    config.write_text("adc_bits: 9\n")
    for flags, expected, clipped in ((["--reram", "adc_bits=8,seed=3"], 3_454_485, 24),
                                     (["--reram-config", str(config)], 4_145_280, 0)):
        out, report = tmp_path / "y.npz", tmp_path / "report.json"
        argv = ["run", str(model_path), "--runtime", "reram", "--input", str(inputs), "--output", str(out),
                "--report", str(report), *flags]
        assert main(argv) == 0
        assert np.load(out)["y"][0, 0] == expected
        section = json.loads(report.read_text())["reram"]
        assert (section["adc_conversions"], section["saturated_conversions"]) == (64, clipped)
    assert main(["run", str(model_path), "--runtime", "reram", "--input", str(inputs), "--output",
                 str(tmp_path / "z.npz"), "--reram", "adc_range=wide"]) == 2
