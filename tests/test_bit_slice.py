"""The bit-slice pass: ADC hand cases, statistics against a naive count, unchanged graph, metadata, errors, plot."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.errors import UsageError
from passes import PassContext, get_pass
from passes.bit_slice import METADATA_KEY, BitSlice
from passes.quantize import Quantize


def _check(model: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(model, full_check=True)
    return model


def qdq_gemm(codes: np.ndarray, trans_b: int = 0, zero_point: np.ndarray | None = None) -> onnx.ModelProto:
    """x [N, K] → Gemm with B = DequantizeLinear(codes) (integer initializer, per-tensor scale 2^-7)."""
    k = codes.shape[1] if trans_b else codes.shape[0]
    m = codes.shape[0] if trans_b else codes.shape[1]
    zero = zero_point if zero_point is not None else np.zeros((), codes.dtype)
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], name="w_dq"),
            helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=trans_b),
        ],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", m])],
        [
            numpy_helper.from_array(codes, "w_q"),
            numpy_helper.from_array(np.float32(2**-7), "w_scale"),
            numpy_helper.from_array(zero, "w_zero"),
        ],  # fmt: skip
    )
    return _check(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def run_bit_slice(model, **options):
    result, report = BitSlice(BitSlice.Options(**options)).run(model, PassContext())
    return _check(result), report


def test_adc_hand_case_128_rows_2bit_cells_1bit_inputs():
    model = qdq_gemm(np.full((128, 4), 127, np.int8))
    _, report = run_bit_slice(model)
    layer = report["layers"][0]
    assert layer["slices"] == 4 and layer["slice_max"] == [3, 3, 3, 1]
    assert layer["max_column_sum"] == [384, 384, 384, 128]
    # full 2-bit slices: 0..384 needs 9 bits; the top slice can only hold 1 bit: 0..128 needs 8
    assert layer["adc_bits_needed"] == [9, 9, 9, 8] == layer["adc_bits_worst_case"] == layer["adc_bits"]
    assert report["adc_plan"] == [9, 9, 9, 8]
    assert layer["slice_sparsity"] == [0.0, 0.0, 0.0, 0.0]


def test_adc_hand_case_256_rows_4bit_cells_3bit_inputs():
    model = qdq_gemm(np.full((4, 256), -127, np.int8), trans_b=1)
    _, report = run_bit_slice(model, rows=256, cell_bits=4, input_bits_per_cycle=3)
    layer = report["layers"][0]
    assert (layer["k"], layer["columns"], layer["row_tiles"]) == (256, 4, 1)
    assert layer["max_column_sum"] == [256 * 15, 256 * 7]
    assert layer["adc_bits_needed"] == [15, 14]  # 26 880 -> 15 bits; 12 544 -> 14 bits


def naive_layer_stats(matrices, bits, cell_bits, sign, rows, v):
    """Per-slice sparsity, per-tile max column sums and needed ADC bits, with plain Python integers."""
    offset = 0 if sign == "differential" else 2 ** (bits - 1)
    count = -(-(bits - 1 if sign == "differential" else bits) // cell_bits)
    zeros, tile_max, cells = [0] * count, None, 0
    for matrix in matrices:
        k, m = matrix.shape
        tiles = -(-k // rows)
        tile_max = tile_max or [[0] * tiles for _ in range(count)]
        for s in range(count):
            for j in range(m):
                for t in range(tiles):
                    sums = {}
                    for i in range(t * rows, min(k, (t + 1) * rows)):
                        q = int(matrix[i, j])
                        stored = q + offset if sign == "offset" else abs(q)
                        digit = (stored >> (cell_bits * s)) & (2**cell_bits - 1)
                        polarity = 0 if sign == "offset" or q >= 0 else 1
                        sums[polarity] = sums.get(polarity, 0) + digit
                        zeros[s] += digit == 0
                    tile_max[s][t] = max(tile_max[s][t], *sums.values())
        cells += matrix.size
    zeros = [z / (cells * 1) for z in zeros]
    needed = [max(1, (max(row) * (2**v - 1)).bit_length()) for row in tile_max]
    return zeros, tile_max, needed


def conv_model(seed: int = 0) -> onnx.ModelProto:
    """Conv(3→4, 3x3) → Relu → grouped Conv(4→6, group 2, 3x3) → Flatten → MatMul, input [N, 3, 5, 5]."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", group=2),
        helper.make_node("Flatten", ["c2"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "w3"], ["y"], name="head"),
    ]
    weights = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
               for n, s in (("w1", (4, 3, 3, 3)), ("w2", (6, 2, 3, 3)), ("w3", (54, 5)))]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        weights,
    )
    return _check(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def quantized_conv_model(bits: int = 8) -> onnx.ModelProto:
    data = {"x": np.random.default_rng(1).uniform(0, 1, (16, 3, 5, 5)).astype(np.float32)}
    model, _ = Quantize(Quantize.Options(bits=bits)).run(
        conv_model(), PassContext(calibration=data, calibration_is_random=False)
    )
    return model


def codes_of(model, node_name):
    node = next(n for n in model.graph.node if n.name == node_name)
    dq = next(n for n in model.graph.node if node.input[1] in n.output)
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == dq.input[0]).astype(np.int64)


@pytest.mark.parametrize(
    "bits,cell_bits,sign,rows,v",
    [(8, 2, "differential", 128, 1), (8, 1, "offset", 8, 2), (6, 4, "differential", 16, 3), (5, 3, "offset", 20, 1)],
    ids=lambda p: str(p),
)
def test_statistics_match_a_naive_count(bits, cell_bits, sign, rows, v):
    model = quantized_conv_model(bits)
    _, report = run_bit_slice(model, cell_bits=cell_bits, sign=sign, rows=rows, input_bits_per_cycle=v)
    layers = {layer["node"]: layer for layer in report["layers"]}
    assert list(layers) == ["conv1", "conv2", "head"]
    w1, w2, w3 = codes_of(model, "conv1"), codes_of(model, "conv2"), codes_of(model, "head")
    # crossbar layout: Conv rows K = (C/group)·kh·kw in (c, kh, kw) order, one matrix per group
    matrices = {
        "conv1": [w1.reshape(4, 27).T],
        "conv2": [w2[:3].reshape(3, 18).T, w2[3:].reshape(3, 18).T],
        "head": [w3],
    }
    for name, mats in matrices.items():
        layer = layers[name]
        sparsity, tile_max, needed = naive_layer_stats(mats, bits, cell_bits, sign, rows, v)
        assert layer["bits"] == bits and layer["groups"] == len(mats) and layer["k"] == mats[0].shape[0]
        assert layer["slice_sparsity"] == pytest.approx(sparsity, abs=1e-6)
        assert layer["max_column_sum_per_tile"] == tile_max
        assert layer["adc_bits_needed"] == needed == layer["adc_bits"]
        assert sum(layer["adc_bits_histogram"][0].values()) == len(mats) * len(tile_max[0]) * mats[0].shape[1] * (
            2 if sign == "differential" else 1
        )
    assert report["adc_plan"] == [
        max(col) for col in zip(*(layer["adc_bits"] for layer in layers.values()), strict=True)
    ]


def test_graph_is_unchanged_outputs_bit_identical_and_metadata_round_trips(tmp_path):
    model = quantized_conv_model()
    sliced, report = run_bit_slice(model)
    assert sliced.graph.SerializeToString() == model.graph.SerializeToString()
    feeds = {"x": np.random.default_rng(2).uniform(0, 1, (8, 3, 5, 5)).astype(np.float32)}
    before = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    after = ort.InferenceSession(sliced.SerializeToString()).run(None, feeds)[0]
    assert np.array_equal(before, after)
    path = tmp_path / "sliced.onnx"
    onnx.save(sliced, str(path))
    stored = json.loads(next(p.value for p in onnx.load(str(path)).metadata_props if p.key == METADATA_KEY))
    assert stored["layers"] == report["layers"] and stored["adc_plan"] == report["adc_plan"]
    assert (stored["cell_bits"], stored["sign"], stored["rows"], stored["input_bits_per_cycle"]) == (
        2,
        "differential",
        128,
        1,
    )
    assert stored["layers"][0]["weight"].endswith("_quantized") and stored["layers"][0]["slices"] == 4
    again, _ = run_bit_slice(sliced, cell_bits=4)
    assert [p.key for p in again.metadata_props].count(METADATA_KEY) == 1


def test_four_bit_weights_in_int8_containers_use_the_declared_width():
    model = quantized_conv_model(bits=4)
    _, report = run_bit_slice(model)
    assert {layer["bits"] for layer in report["layers"]} == {4}
    assert {layer["slices"] for layer in report["layers"]} == {2}  # 3 magnitude bits in 2-bit cells


def test_zero_points_are_removed_and_out_of_range_codes_widen_the_slicing():
    codes = np.array([[0, 255], [128, 1]], np.uint8)  # zero point 128: signed codes -128, 127, 0, -127
    _, report = run_bit_slice(qdq_gemm(codes, zero_point=np.uint8(128)))
    layer = report["layers"][0]
    assert layer["bits"] == 9 and "sliced as 9 bits" in layer["note"]  # |−128| needs 8 magnitude bits
    # B is K x N: column 0 holds -128 (w- = 2·4^3), column 1 holds 127 and -127 (w+ = w- = 3 + 3·4 + 3·16 + 1·64),
    # each polarity array digitized on its own: per slice the largest column sum is 3, 3, 3 and max(2, 1)
    assert layer["max_column_sum"] == [3, 3, 3, 2]
    _, report = run_bit_slice(qdq_gemm(codes, zero_point=np.uint8(128)), sign="offset")
    assert report["layers"][0]["bits"] == 8 and "note" not in report["layers"][0]


def test_qlinear_matmul_weights_are_read_directly():
    b = np.array([[3, -2], [0, 7]], np.int8)
    inits = [numpy_helper.from_array(v, n) for v, n in (
        (np.float32(0.1), "a_s"), (np.uint8(0), "a_z"), (b, "b"), (np.float32(0.1), "b_s"), (np.int8(0), "b_z"),
        (np.float32(0.2), "y_s"), (np.uint8(0), "y_z"))]  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("QLinearMatMul", ["a", "a_s", "a_z", "b", "b_s", "b_z", "y_s", "y_z"], ["y"], name="mm")],
        "qmm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 2])],
        inits,
    )
    model = _check(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    _, report = run_bit_slice(model)
    assert report["layers"][0]["max_column_sum"] == [3, 1, 0, 0]  # column 1: w+ = 7 (3, 1), w- = 2 (2)


def test_float_model_asks_for_quantize_first():
    with pytest.raises(UsageError, match="run the quantize pass first"):
        BitSlice().run(conv_model(), PassContext())


@pytest.mark.parametrize(
    "spec,needle",
    [
        ({"cell_bits": "0"}, "cell_bits=0"),
        ({"cell_bits": "5"}, "cell_bits=5"),
        ({"input_bits_per_cycle": "9"}, "input_bits_per_cycle=9"),
        ({"rows": "0"}, "rows=0"),
        ({"sign": "magnitude"}, "sign"),
        ({"coverage": "0"}, "coverage=0"),
        ({"plot": "out.jpg"}, "plot="),
        ({"plot": "/no/such/dir/p.png"}, "does not exist"),
    ],
)
def test_bad_options_are_usage_errors_naming_the_option(spec, needle):
    with pytest.raises(UsageError, match=needle):
        get_pass("bit-slice").from_spec(spec)


def test_coverage_below_one_can_lower_the_plan():
    codes = np.zeros((128, 100), np.int8)
    codes[:, 0] = 127  # one full column, 99 nearly empty ones
    codes[0, 1:] = 1
    _, full = run_bit_slice(qdq_gemm(codes))
    _, most = run_bit_slice(qdq_gemm(codes), coverage=0.99)
    assert full["adc_plan"] == [9, 9, 9, 8]
    assert most["adc_plan"] == [1, 1, 1, 1]


def test_plot_is_a_png_artifact_not_a_file_written_by_the_pass(tmp_path):
    path = tmp_path / "slices.png"
    result = BitSlice(BitSlice.Options(plot=str(path))).run(quantized_conv_model(), PassContext())
    assert result.report["plot"] == str(path) and not path.exists()
    (artifact,) = result.artifacts
    assert (artifact.path, artifact.what) == (str(path), "bit-slice plot")
    assert artifact.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_digits_pipeline_verifies_bit_slice_as_exact(digits_assets):
    from optimizer.data import load_npz
    from optimizer.pipeline import optimize

    cal = load_npz(digits_assets.calibration)
    model, report = optimize(digits_assets.model, ["cleanup", "quantize", "bit-slice"], calibration=cal)
    bit_slice = report["passes"][2]
    assert bit_slice["contract"] == "exact" and bit_slice["verify"]["max_abs_err"] == 0.0
    plan = json.loads(next(p.value for p in model.metadata_props if p.key == METADATA_KEY))
    assert len(plan["layers"]) == 5 and all(len(layer["adc_bits"]) == 4 for layer in plan["layers"])
    assert all(
        b <= w for layer in plan["layers"] for b, w in zip(layer["adc_bits"], layer["adc_bits_worst_case"], strict=True)
    )
