"""optimizer.quant: DFP and affine grids, range searches, bit slices and ADC bits, against hand cases and ORT."""

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer import quant


def test_frac_length_hand_cases():
    assert quant.frac_length(0.5, 8) == 7  # 0.5 · 2^8 = 128 > 127
    assert quant.frac_length(0.49, 8) == 8  # 0.49 · 256 = 125.4
    assert quant.frac_length(3.0, 8) == 5  # 3 · 32 = 96, 3 · 64 = 192
    assert quant.frac_length(1.0, 8, signed=False) == 7  # 255 / 1 -> 2^7
    assert quant.frac_length(0.0, 6) == 5
    assert quant.frac_length(100.0, 4) == -4  # 100 · 2^-4 = 6.25 ≤ 7
    np.testing.assert_array_equal(quant.frac_length(np.array([0.5, 0.1, 0.0]), 8), [7, 10, 7])


def test_dfp_frac_length_per_channel_matches_a_per_row_loop():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3, 3, 3)) * rng.uniform(0.01, 3, size=(6, 1, 1, 1))
    fl = quant.dfp_frac_length(w, 8, axis=0)
    expected = [int(np.floor(np.log2(127 / np.abs(w[c]).max()))) for c in range(6)]
    np.testing.assert_array_equal(fl, expected)
    gemm_b = rng.standard_normal((5, 4))  # Gemm B without transB: output channels on axis 1
    np.testing.assert_array_equal(
        quant.dfp_frac_length(gemm_b, 6, axis=1),
        [int(np.floor(np.log2(31 / np.abs(gemm_b[:, j]).max()))) for j in range(4)],
    )
    assert quant.dfp_frac_length(w, 8) == int(np.floor(np.log2(127 / np.abs(w).max())))


def test_percentile_ignores_an_outlier_and_mse_never_loses_to_max():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(10000) * 0.1
    x[0] = 40.0
    fl_max = quant.dfp_frac_length(x, 8)
    fl_pct = quant.dfp_frac_length(x, 8, method="percentile", percentile=99.9)
    assert fl_max == 1 and fl_pct > fl_max + 3
    fl_mse = quant.dfp_frac_length(x, 8, method="mse")
    assert fl_max <= fl_mse <= fl_max + quant.MSE_EXTRA_FRAC_BITS

    def err(fl):
        return np.mean((x - quant.fake_quantize_dfp(x, 8, fl)) ** 2)

    assert err(fl_mse) <= err(fl_max)
    scale_max = quant.symmetric_scale(x, 8)
    scale_mse = quant.symmetric_scale(x, 8, method="mse")
    assert scale_max == pytest.approx(40.0 / 127, rel=1e-6)
    assert np.mean((x - quant.fake_quantize_symmetric(x, 8, scale_mse)) ** 2) <= np.mean(
        (x - quant.fake_quantize_symmetric(x, 8, scale_max)) ** 2
    )


def test_weight_grid_docstring_example_and_exact_power_of_two_scales():
    grid = quant.weight_grid(np.array([[0.5, -0.25], [0.1, 0.0]]), 8, "dfp", axis=0)
    np.testing.assert_array_equal(grid.frac_length, [7, 10])
    np.testing.assert_array_equal(grid.codes, [[64, -32], [102, 0]])
    np.testing.assert_array_equal(grid.scale, np.float32([2.0**-7, 2.0**-10]))
    rng = np.random.default_rng(2)
    for bits in range(4, 9):
        w = rng.standard_normal((8, 16)).astype(np.float32)
        grid = quant.weight_grid(w, bits, "dfp", axis=0)
        assert grid.codes.dtype == np.int8 and np.abs(grid.codes).max() <= 2 ** (bits - 1) - 1
        np.testing.assert_array_equal(grid.scale.astype(np.float64), np.exp2(-grid.frac_length.astype(np.float64)))
        # step ≤ the spacing of the range: every |w| fits, and one more fractional bit would clip some channel
        assert np.all(np.abs(w).max(axis=1) * np.exp2(grid.frac_length) <= 2 ** (bits - 1) - 1)
        assert np.all(np.abs(w).max(axis=1) * np.exp2(grid.frac_length + 1) > 2 ** (bits - 1) - 1)
        affine = quant.weight_grid(w, bits, "affine")
        assert affine.axis is None and affine.scale.shape == (1,)
        assert np.abs(affine.codes).max() == 2 ** (bits - 1) - 1


def _ort_qdq(values: np.ndarray, scale: float, zero_point: int, dtype) -> np.ndarray:
    """QuantizeLinear → DequantizeLinear as onnxruntime computes it (the independent reference)."""
    elem = TensorProto.UINT8 if dtype == np.uint8 else TensorProto.INT8
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [values.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [values.size])],
        [numpy_helper.from_array(np.float32(scale), "s"), helper.make_tensor("z", elem, [], [zero_point])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString()).run(None, {"x": values})[0]


@pytest.mark.parametrize("kind,low", [("dfp", 0.0), ("dfp", -1.5), ("affine", 0.0), ("affine", -1.5)])
def test_activation_grid_roundtrip_matches_onnxruntime(kind, low):
    rng = np.random.default_rng(3)
    values = rng.uniform(low, 3.0, size=4000).astype(np.float32)
    values[:3] = [0.0, 3.0, low]
    grid = quant.activation_grid(values, kind)
    assert grid.dtype == ("int8" if kind == "dfp" and low < 0 else "uint8")
    if kind == "dfp":
        assert grid.zero_point == 0 and grid.scale == 2.0**-grid.frac_length
        restored = quant.dfp_activation_roundtrip(values, grid.frac_length, low < 0)
    else:
        restored = quant.fake_quantize_affine(values, grid.scale, grid.zero_point)
    expected = _ort_qdq(values, grid.scale, grid.zero_point, np.int8 if grid.dtype == "int8" else np.uint8)
    np.testing.assert_array_equal(restored, expected)
    assert grid.error == pytest.approx(quant.relative_error(values, expected))
    assert grid.error < 0.01


def test_affine_range_methods():
    x = np.concatenate([np.linspace(-1, 1, 1001), [50.0]])
    assert quant.affine_range(x) == (-1.0, 50.0)
    lo, hi = quant.affine_range(x, method="percentile", percentile=99.0)
    assert -1.0 < lo < -0.9 and 0.9 < hi < 1.0
    gaussian = np.random.default_rng(6).standard_normal(100000)
    lo, hi = quant.affine_range(gaussian, method="mse")
    assert gaussian.min() < lo < 0 < hi < gaussian.max()

    def err(lo, hi):
        scale, zero_point = quant.affine_params(lo, hi)
        return np.mean((gaussian - quant.fake_quantize_affine(gaussian, scale, zero_point)) ** 2)

    assert err(lo, hi) < err(gaussian.min(), gaussian.max())


def test_range_observer_keeps_exact_extremes_when_subsampling():
    rng = np.random.default_rng(4)
    observer = quant.RangeObserver()
    batches = [rng.standard_normal(5000).astype(np.float32) for _ in range(4)]
    for batch in batches:
        observer.add(batch, per_batch=100, rng=rng)
    everything = np.concatenate(batches)
    values = observer.values()
    assert values.size == 4 * 100 + 2
    assert values.min() == everything.min() and values.max() == everything.max()


@pytest.mark.parametrize("sign", ["differential", "offset"])
@pytest.mark.parametrize("cell_bits", [1, 2, 3, 4])
@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
def test_slices_reconstruct_integer_weights_exactly(bits, cell_bits, sign):
    rng = np.random.default_rng(bits * 10 + cell_bits)
    top = 2 ** (bits - 1) - 1
    low = -top if sign == "differential" else -(2 ** (bits - 1))
    q = rng.integers(low, top + 1, size=(7, 5, 3))
    q.flat[:2] = [low, top]
    slices, offset = quant.split_slices(q, bits, cell_bits, sign)
    magnitude_bits = bits - 1 if sign == "differential" else bits
    assert slices.shape == (-(-magnitude_bits // cell_bits), 2 if sign == "differential" else 1, *q.shape)
    assert slices.min() >= 0 and slices.max() <= 2**cell_bits - 1
    for s, most in enumerate(quant.slice_max_values(bits, cell_bits, sign)):
        assert slices[s].max() <= most
    np.testing.assert_array_equal(quant.join_slices(slices, cell_bits, offset), q)
    # independent reference: digits of |q| (differential) or of q + 2^(b-1) (offset), least significant first
    stored = np.abs(q) if sign == "differential" else q + 2 ** (bits - 1)
    digits = np.stack([(stored >> (cell_bits * s)) & (2**cell_bits - 1) for s in range(slices.shape[0])])
    np.testing.assert_array_equal(slices.sum(axis=1), digits)
    if sign == "differential":
        assert not np.any((slices[:, 0] > 0) & (slices[:, 1] > 0))


def test_split_slices_rejects_out_of_range_and_float_codes():
    with pytest.raises(ValueError, match="8-bit"):
        quant.split_slices(np.array([-128]), 8, 2, "differential")
    with pytest.raises(TypeError):
        quant.split_slices(np.array([1.5]), 8, 2)


def test_slice_max_values_hand_cases():
    assert quant.slice_max_values(8, 2, "differential") == [3, 3, 3, 1]
    assert quant.slice_max_values(8, 4, "differential") == [15, 7]
    assert quant.slice_max_values(8, 2, "offset") == [3, 3, 3, 3]
    assert quant.slice_max_values(5, 2, "offset") == [3, 3, 1]
    assert quant.slice_max_values(4, 1, "differential") == [1, 1, 1]


def test_adc_bits_hand_cases():
    # 128 rows of 2-bit cells, 1-bit inputs: 0..384 -> 9 bits
    assert quant.full_adc_bits(128, 3, 1) == 9
    assert quant.adc_bits_needed(128 * 3, 1) == 9
    # the int8 top slice holds only 1 bit: 0..128 -> 8 bits (129 levels; 7 bits would clip the all-ones column)
    assert quant.full_adc_bits(128, 1, 1) == 8
    assert quant.adc_bits_needed(128, 1) == 8 and quant.adc_bits_for(127) == 7
    # PRIME: 256 rows of 4-bit cells, 3-bit inputs: 256 · 15 · 7 = 26 880 -> 15 bits
    assert quant.full_adc_bits(256, 15, 3) == 15
    assert quant.adc_bits_needed(256 * 15, 3) == 15
    assert quant.adc_bits_for(0) == 1 and quant.adc_bits_for(1) == 1 and quant.adc_bits_for(2) == 2


def test_adc_bits_needed_vectorized_matches_the_scalar_form():
    sums = np.arange(0, 5000)
    for v in (1, 2, 3, 8):
        expected = [quant.adc_bits_for(int(s) * (2**v - 1)) for s in sums]
        np.testing.assert_array_equal(quant.adc_bits_needed(sums, v), expected)


def test_column_sums_match_a_loop_over_tiles():
    rng = np.random.default_rng(5)
    slices = rng.integers(0, 4, size=(3, 2, 37, 5))
    rows = 16
    sums = quant.column_sums(slices, rows)
    assert sums.shape == (3, 2, 3, 5)
    for s, p, tile, col in itertools.product(range(3), range(2), range(3), range(5)):
        assert sums[s, p, tile, col] == sum(int(v) for v in slices[s, p, tile * rows : (tile + 1) * rows, col])
