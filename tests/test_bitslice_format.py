"""The bit-slice L1 authors' number format end to end: sign + 8-bit magnitude, step 2^(ceil(log2 max|w|) - 8).

bitslice_l1(magnitude_bits=8) against the authors' formula (value and straight-through gradient, including the
|w| = 2^s edge), the QAT module and its int16 export against ONNX Runtime and numpy, the quantize and bit-slice
passes, the reram emulator bit-exact with ideal ADCs, per-slice ADC area and `reram-sweep --adc-bits-per-slice`.
"""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from test_regularizers import paper_bitslice_l1

import runtimes
from optimizer import quant
from optimizer.cli import main
from optimizer.training import bitslice_l1, export, magnitude_slices, prepare_qat
from passes import PassContext
from passes.bit_slice import BitSlice
from passes.quantize import Quantize
from runtimes.reram import cost
from runtimes.reram.config import parse_options


def _tensor(case: str) -> np.ndarray:
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    if case == "edge_power_of_two":  # max|w| = 2^s exactly: |q| = 256, top slice 4
        w = rng.uniform(-0.5, 0.5, (7, 9))
        w[3, 4] = -0.5
    elif case == "edge_rounds_up":  # 255.7 steps rounds to 256 as well
        w = rng.uniform(-0.4, 0.4, (5, 6))
        w[0, 0] = 255.7 / 512
    elif case == "sparse":  # pruned weights: zeros have zero gradient (torch abs at 0)
        w = rng.normal(0, 0.1, (10, 12)) * (rng.uniform(size=(10, 12)) > 0.6)
    else:
        scale = {"small": 0.003, "wide": 3.0, "normal": 0.2}[case]
        w = rng.normal(0, scale, (16, 20))
    return w


CASES = ["normal", "small", "wide", "sparse", "edge_power_of_two", "edge_rounds_up"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_bitslice_l1_magnitude_bits_8_equals_the_authors_formula(case, dtype):
    w0 = _tensor(case)
    ours = torch.tensor(w0, dtype=dtype, requires_grad=True)
    theirs = torch.tensor(w0, dtype=dtype, requires_grad=True)
    value, reference = bitslice_l1(ours, magnitude_bits=8, cell_bits=2), paper_bitslice_l1(theirs)
    value.backward()
    reference.backward()
    assert float(value.detach()) == float(reference.detach())
    np.testing.assert_allclose(ours.grad.numpy(), theirs.grad.numpy(), rtol=1e-6 if dtype == torch.float32 else 1e-12)


def test_edge_magnitude_256_puts_4_in_the_top_slice_and_only_the_top_slice_pulls():
    w = torch.tensor([0.5, 0.3, -0.1, 0.0], dtype=torch.float64, requires_grad=True)
    slices, fl = magnitude_slices(w, magnitude_bits=8, cell_bits=2)
    assert fl == 9  # s = ceil(log2 0.5) = -1, step 2^(s - 8)
    # |q| = 256, 154, 51, 0 -> LSB..MSB digits [0,0,0,4], [2,2,1,2], [3,0,3,0], [0,0,0,0]
    np.testing.assert_array_equal(slices.T, [[0, 0, 0, 4], [2, 2, 1, 2], [3, 0, 3, 0], [0, 0, 0, 0]])
    value = bitslice_l1(w, magnitude_bits=8)
    value.backward()
    assert float(value.detach()) == 4 + 7 + 6
    # sign(w) / step · Σ_nonzero 4^-k: 512/64; 512·(1 + 1/4 + 1/16 + 1/64); -512·(1 + 1/16); 0
    np.testing.assert_allclose(w.grad.numpy(), [8.0, 680.0, -544.0, 0.0])


def test_magnitude_grid_hand_case_saturates_the_edge_for_deployment():
    grid = quant.magnitude_grid(np.array([[0.3, -0.1], [0.5, 0.02]]), 8)
    assert grid.codes.dtype == np.int16 and grid.frac_length.tolist() == [9]
    np.testing.assert_array_equal(grid.codes, [[154, -51], [255, 10]])
    training = quant.quantize_magnitude(np.array([0.5]), 8, -1, deploy=False)
    assert training.tolist() == [256]
    per_channel = quant.magnitude_grid(np.array([[0.3, -0.1], [0.05, 0.02]]), 8, axis=0)
    assert per_channel.frac_length.tolist() == [9, 12]  # ceil(log2 0.3) = -1, ceil(log2 0.05) = -4


# --- QAT in the authors' format and its int16 export ------------------------------------------------------------------


def _qat_mlp(seed: int = 0, scale: float = 0.6) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.ReLU(), torch.nn.Linear(9, 4))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(scale)  # max|w| well inside (2^(s-1), 2^s - step/2): no edge code
    prepare_qat(model, magnitude_bits=8)
    model.train()
    for _ in range(3):
        model(torch.rand(16, 12))
    return model.eval()


def test_qat_forward_is_the_authors_fake_quantization():
    model = _qat_mlp()
    w = model[0].weight.detach().double()
    s = torch.ceil(torch.log2(w.abs().max()))
    step = 2 ** (s - 8)
    expected = torch.clamp(torch.round(w / step) * step, -(2**s), 2**s)
    np.testing.assert_array_equal(model[0].weight_quant(model[0].weight).detach().double().numpy(), expected.numpy())


def test_qat_export_holds_int16_codes_and_onnx_runtime_equals_torch_and_numpy(tmp_path):
    model = _qat_mlp()
    x = torch.rand(20, 12)
    with torch.no_grad():
        expected = model(x).numpy()
    proto = export(model, x[:1], tmp_path / "m.onnx")
    assert {o.domain: o.version for o in proto.opset_import}[""] == 21
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    codes = values["0.weight_quantized"]
    assert codes.dtype == np.int16 and np.abs(codes).max() <= 255
    meta = json.loads(next(p.value for p in proto.metadata_props if p.key == "sculpt.quant"))
    entry = meta["weights"]["0.weight_quantized"]
    assert (entry["bits"], entry["format"], entry["magnitude_bits"], entry["saturated"]) == (9, "sign-magnitude", 8, 0)
    np.testing.assert_array_equal(codes * values["0.weight_scale"], model[0].weight_quant(model[0].weight).detach())
    got = ort.InferenceSession(proto.SerializeToString()).run(None, {"input": x.numpy()})[0]
    np.testing.assert_array_equal(got, expected)
    # numpy: quantized input times dequantized codes plus bias, relu, and the same again
    info = model[0].quantization_info()
    xq = np.clip(np.rint(x.numpy() * 2.0 ** info["input_frac_length"]), 0, 255) * 2.0 ** -info["input_frac_length"]
    w1 = codes * values["0.weight_scale"].astype(np.float64)
    b1 = values["0.bias_quantized"] * values["0.bias_scale"].astype(np.float64)
    hidden = np.maximum(xq @ w1.T + b1, 0)
    fl2 = model[2].quantization_info()["input_frac_length"]
    hq = np.clip(np.rint(hidden * 2.0**fl2), 0, 255) * 2.0**-fl2
    w2 = values["2.weight_quantized"] * values["2.weight_scale"].astype(np.float64)
    b2 = values["2.bias_quantized"] * values["2.bias_scale"].astype(np.float64)
    np.testing.assert_allclose(got, hq @ w2.T + b2, rtol=0, atol=1e-5)


def test_qat_export_saturates_and_counts_an_edge_weight(tmp_path):
    model = _qat_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = 0.5  # a power of two: training code 256
    proto = export(model, torch.zeros(1, 12), tmp_path / "m.onnx")
    codes = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "0.weight_quantized"))
    assert codes[0, 0] == 255 and np.abs(codes).max() == 255
    meta = json.loads(next(p.value for p in proto.metadata_props if p.key == "sculpt.quant"))
    assert meta["weights"]["0.weight_quantized"]["saturated"] == 1


# --- the quantize and bit-slice passes --------------------------------------------------------------------------------


def mlp_onnx(seed: int = 0, k: int = 150, hidden: int = 40) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((k, hidden)) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((5, hidden)) * 0.2).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                               numpy_helper.from_array(np.full(5, 0.05, np.float32), "b2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_quantize_pass_magnitude_bits_writes_int16_codes_that_onnx_runtime_runs(granularity):
    model = mlp_onnx()
    x = np.random.default_rng(1).uniform(0, 1, (40, 150)).astype(np.float32)
    ctx = PassContext(calibration={"x": x}, calibration_is_random=False)
    quantized, report = Quantize(Quantize.Options(magnitude_bits=8, granularity=granularity)).run(model, ctx)
    onnx.checker.check_model(quantized, full_check=True)
    assert next(o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx")) == 21
    values = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    w1 = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    axis = 1 if granularity == "channel" else None
    top = np.abs(w1).max(axis=0) if axis is not None else np.abs(w1).max()
    fl = 8 - np.ceil(np.log2(top))
    codes = values["w1_quantized"]
    assert codes.dtype == np.int16
    np.testing.assert_array_equal(codes, np.clip(np.rint(w1 * 2.0**fl), -255, 255))
    np.testing.assert_array_equal(values["w1_scale"], np.float32(2.0**-fl))
    meta = json.loads(next(p.value for p in quantized.metadata_props if p.key == "sculpt.quant"))
    assert meta["weights"]["w1_quantized"]["bits"] == 9 and meta["weights"]["w1_quantized"]["format"] == \
        "sign-magnitude"
    assert report["weight_format"] == "sign-magnitude" and report["layers"][0]["bits"] == 9
    # ONNX Runtime against numpy on the QDQ graph's own integers and scales
    got = ort.InferenceSession(quantized.SerializeToString()).run(None, {"x": x})[0]
    xs, rs = float(values["x_scale"]), float(values["r_scale"])
    xq = np.clip(np.rint(x / xs), 0, 255) * xs
    hidden = np.maximum(xq @ (codes * values["w1_scale"].astype(np.float64)), 0)
    hq = np.clip(np.rint(hidden / rs), 0, 255) * rs
    w2 = values["w2_quantized"] * values["w2_scale"].astype(np.float64).reshape(-1, 1)
    b2 = values["b2_quantized"] * values["b2_scale"].astype(np.float64)
    np.testing.assert_allclose(got, hq @ w2.T + b2, rtol=0, atol=1e-5)


def test_quantize_pass_magnitude_bits_needs_dfp():
    from optimizer.errors import UsageError

    with pytest.raises(UsageError, match="scale=dfp"):
        Quantize(Quantize.Options(magnitude_bits=8, scale="affine")).validate()


def test_bit_slice_pass_cuts_the_8_bit_magnitude_into_four_full_2_bit_slices():
    model = mlp_onnx()
    x = np.random.default_rng(1).uniform(0, 1, (40, 150)).astype(np.float32)
    ctx = PassContext(calibration={"x": x}, calibration_is_random=False)
    quantized, _ = Quantize(Quantize.Options(magnitude_bits=8, granularity="tensor")).run(model, ctx)
    _, report = BitSlice(BitSlice.Options()).run(quantized, PassContext())
    layer = report["layers"][0]
    codes = numpy_helper.to_array(next(t for t in quantized.graph.initializer if t.name == "w1_quantized"))
    digits = quant.magnitude_digits(codes, 8, 2)
    assert layer["bits"] == 9 and layer["slices"] == 4 and layer["slice_max"] == [3, 3, 3, 3]
    np.testing.assert_allclose(layer["slice_sparsity"], (digits == 0).reshape(4, -1).mean(axis=1), atol=1e-6)
    # K = 150 rows: tiles of 128 and 22; a full tile column of 3s needs 9 bits
    assert layer["adc_bits_worst_case"] == [9, 9, 9, 9]


# --- the reram emulator -----------------------------------------------------------------------------------------------


def int16_qdq_model(weight: np.ndarray, k: int) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, np.uint8), "xz"),
             numpy_helper.from_array(weight.astype(np.int16), "wq"),
             numpy_helper.from_array(np.array(1.0, np.float32), "ws"),
             numpy_helper.from_array(np.array(0, np.int16), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="layer")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.metadata_props.add(key="sculpt.quant", value=json.dumps({"weights": {"wq": {"bits": 9}}}))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("k,m", [(300, 70), (128, 128), (1, 5)], ids=str)
def test_authors_format_runs_bit_exactly_on_the_emulator_with_ideal_adcs(k, m):
    rng = np.random.default_rng(k * m)
    w = rng.integers(-255, 256, (k, m))
    w.flat[0] = 255
    u = rng.integers(0, 256, (6, k))
    u[0] = 255
    model = int16_qdq_model(w, k)
    expected = u @ w
    x = u.astype(np.float32)
    np.testing.assert_array_equal(ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0], expected)
    for bits in (0, 9):  # ideal, and the full resolution of a 128-row tile of 2-bit cells
        session = runtimes.load("reram", model, adc_bits=bits)
        y = session.run({"x": x})["y"]
        assert np.array_equal(y.astype(np.int64), expected)
        described = session.describe()
        assert described["layers"][0]["slices"] == 4 and described["saturated_conversions"] == 0
    if k > 2:  # a 3-bit ADC clips once three 3-valued cells of a column are driven together
        clipped = runtimes.load("reram", model, adc_bits=3).run({"x": x})["y"]
        assert not np.array_equal(clipped.astype(np.int64), expected)


def test_qat_model_in_the_authors_format_on_the_emulator_equals_onnx_runtime(tmp_path):
    model = _qat_mlp(seed=3)
    x = torch.rand(30, 12).numpy()
    proto = export(model, torch.zeros(1, 12), tmp_path / "m.onnx")
    expected = ort.InferenceSession(proto.SerializeToString()).run(None, {"input": x})[0]
    session = runtimes.load("reram", proto, adc_bits=0)
    np.testing.assert_allclose(session.run({"input": x})["output"], expected, rtol=0, atol=1e-6)
    assert [layer["slices"] for layer in session.describe()["layers"]] == [4, 4]


def test_adc_area_scales_with_bits_per_slice():
    options = parse_options({})
    assert cost.adc_area_mm2(8, "linear") == pytest.approx(0.0012)
    assert cost.adc_area_mm2(1, "linear") == pytest.approx(0.00015)
    assert cost.adc_area_mm2(3, "exp") == pytest.approx(0.0012 / 32)
    # 8 ADC units over 4 slices at 3/3/3/1 bits (LSB first): 2 per slice
    assert cost.adc_area_total(8, [3, 3, 3, 1], options) == pytest.approx(2 * 0.0012 * 10 / 8)


def test_reram_sweep_adc_bits_per_slice_is_msb_first(tmp_path, capsys):
    rng = np.random.default_rng(0)
    w = rng.integers(-255, 256, (20, 3))
    w[:, 0] = 0  # column 0 has only zero slices
    model_path, eval_path, report = tmp_path / "m.onnx", tmp_path / "e.npz", tmp_path / "r.json"
    onnx.save(int16_qdq_model(w, 20), model_path)
    x = rng.integers(0, 256, (8, 20)).astype(np.float32)
    np.savez(eval_path, x=x, labels=(x @ w).argmax(1))
    code = main(["reram-sweep", str(model_path), "--eval", str(eval_path), "--adc-bits", "9",
                 "--adc-bits-per-slice", "1,3,3,3", "--report", str(report)])
    assert code == 0
    point = json.loads(report.read_text())["reram_sweep"]["points"][1]
    assert point["adc_bits"] == [1, 3, 3, 3]
    assert len(point["saturated_by_slice_msb_first"]) == 4 and point["saturated_conversions"] > 0
    # the MSB slice's 1-bit ADC saturates as soon as two MSB cells of a column are driven
    assert point["saturated_by_slice_msb_first"][0] > 0
    assert "per-slice ADC 1,3,3,3 (MSB first)" in capsys.readouterr().out
    assert main(["reram-sweep", str(model_path), "--eval", str(eval_path), "--adc-bits-per-slice", "1,x"]) == 2


def test_sparsity_regularizer_term_takes_the_authors_format():
    from optimizer.training import SparsityRegularizer, Term

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    reg = SparsityRegularizer(model, Term("bitslice_l1", 0.5, magnitude_bits=8))
    expected = sum(float(bitslice_l1(m.weight, magnitude_bits=8).detach()) for m in (model[0], model[2]))
    assert float(reg().detach()) == pytest.approx(0.5 * expected)
    assert reg.describe()["terms"][0]["magnitude_bits"] == 8
