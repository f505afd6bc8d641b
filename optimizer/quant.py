"""Quantization math shared by the `quantize` and `bit-slice` passes, the reram runtime and the training frontend.

Dynamic fixed point (DFP): a b-bit signed integer q with a power-of-two scale, x ≈ q · 2^-fl, where the
fractional length fl is chosen per tensor (or per output channel) so that the largest magnitude fits.
Integers are symmetric, q ∈ [-(2^(b-1) - 1), 2^(b-1) - 1], so that sign and magnitude split cleanly into
differential (w⁺, w⁻) crossbar arrays. Everything here is numpy; torch code calls these on detached values.

Sections: the DFP / affine primitives and slicing (split_slices, join_slices, adc_bits_for); range selection
(max, percentile or MSE search, per tensor or per channel: dfp_frac_length, symmetric_scale, affine_range);
grids for whole tensors (weight_grid, activation_grid, RangeObserver for calibration); and bit-slice statistics
on crossbar matrices (slice_max_values, column_sums, adc_bits_needed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from optimizer import keys

# metadata_props key of a quantized model: per integer weight its bits and scale (schema in passes/quantize.py)
QUANT_METADATA_KEY = keys.QUANT
SignMode = Literal["differential", "offset"]


def qmax(bits: int, signed: bool = True) -> int:
    """The largest integer code: symmetric signed (2^(b-1) - 1) or unsigned (2^b - 1)."""
    return (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1


def frac_length(max_abs: float | np.ndarray, bits: int, signed: bool = True) -> int | np.ndarray:
    """Largest fl with max_abs · 2^fl ≤ qmax(bits): the finest power-of-two step that does not clip.

    An all-zero tensor gets fl = bits - 1 (any fl is exact for it; this one keeps the scale finite).
    Works elementwise on arrays (one fl per output channel).
    """
    m = np.asarray(max_abs, dtype=np.float64)
    safe = np.where(m > 0, m, 1.0)
    fl = np.floor(np.log2(qmax(bits, signed) / safe)).astype(np.int64)
    fl = np.where(m > 0, fl, bits - 1)
    return int(fl) if fl.ndim == 0 else fl


def quantize_dfp(x: np.ndarray, bits: int, fl: int | np.ndarray, signed: bool = True) -> np.ndarray:
    """Integer codes round(x · 2^fl), saturated to the b-bit range. `fl` broadcasts against x."""
    lo = -qmax(bits, signed) if signed else 0
    q = np.rint(np.asarray(x, dtype=np.float64) * np.exp2(fl))
    return np.clip(q, lo, qmax(bits, signed)).astype(np.int64)


def dequantize_dfp(q: np.ndarray, fl: int | np.ndarray) -> np.ndarray:
    return (np.asarray(q, dtype=np.float64) * np.exp2(-np.asarray(fl, dtype=np.float64))).astype(np.float32)


def fake_quantize_dfp(x: np.ndarray, bits: int, fl: int | np.ndarray, signed: bool = True) -> np.ndarray:
    return dequantize_dfp(quantize_dfp(x, bits, fl, signed), fl)


def affine_params(lo: float, hi: float, bits: int = 8, signed: bool = False) -> tuple[float, int]:
    """Scale and zero point of an affine b-bit grid covering [lo, hi] (which always includes 0, so 0 is exact)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qlo, qhi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if hi == lo:
        return 1.0, 0 if signed else qlo
    scale = (hi - lo) / (qhi - qlo)
    zero_point = int(np.clip(round(qlo - lo / scale), qlo, qhi))
    return scale, zero_point


def num_slices(magnitude_bits: int, cell_bits: int) -> int:
    return math.ceil(magnitude_bits / cell_bits)


def split_slices(q: np.ndarray, bits: int, cell_bits: int, sign: SignMode = "differential") -> tuple[np.ndarray, int]:
    """Split b-bit signed integers into cell slices, least significant slice first.

    differential: returns slices of shape (S, 2, *q.shape) — [:, 0] holds w⁺ = max(q, 0), [:, 1] holds
      w⁻ = max(-q, 0) — with S = ceil((b-1)/c); q = Σ_s 2^(c·s) (d⁺_s − d⁻_s). The offset returned is 0.
    offset: stores q + 2^(b-1) (unsigned b-bit) in one array set; slices have shape (S, 1, *q.shape) with
      S = ceil(b/c); q = Σ_s 2^(c·s) d_s − offset, offset = 2^(b-1).
    """
    q = np.asarray(q)
    if not np.issubdtype(q.dtype, np.integer):
        raise TypeError("split_slices needs integer codes")
    q = q.astype(np.int64)
    mask = (1 << cell_bits) - 1
    if sign == "differential":
        if np.abs(q).max(initial=0) > qmax(bits):
            raise ValueError(f"values exceed the {bits}-bit signed range")
        planes = np.stack([np.maximum(q, 0), np.maximum(-q, 0)])
        n, offset = num_slices(bits - 1, cell_bits), 0
    elif sign == "offset":
        offset = 1 << (bits - 1)
        unsigned = q + offset
        if unsigned.min(initial=0) < 0 or unsigned.max(initial=0) >= (1 << bits):
            raise ValueError(f"values exceed the {bits}-bit signed range")
        planes = unsigned[None]
        n = num_slices(bits, cell_bits)
    else:
        raise ValueError(f"unknown sign mode {sign!r}")
    slices = np.stack([(planes >> (cell_bits * s)) & mask for s in range(n)])
    return slices, offset


def join_slices(slices: np.ndarray, cell_bits: int, offset: int = 0) -> np.ndarray:
    """Inverse of split_slices."""
    weights = (1 << (cell_bits * np.arange(slices.shape[0], dtype=np.int64))).reshape(-1, *([1] * (slices.ndim - 1)))
    planes = (slices.astype(np.int64) * weights).sum(axis=0)
    if planes.shape[0] == 2:
        return planes[0] - planes[1]
    return planes[0] - offset


def adc_bits_for(max_column_sum: int) -> int:
    """Bits an ADC needs to resolve every value in 0..max_column_sum without saturating (≥ 1)."""
    return max(1, math.ceil(math.log2(int(max_column_sum) + 1)))


def full_adc_bits(rows: int, cell_max: int, input_bits_per_cycle: int) -> int:
    """ADC bits for the worst column: every one of `rows` cells at `cell_max`, every input digit at its max."""
    return adc_bits_for(rows * cell_max * ((1 << input_bits_per_cycle) - 1))


# --- Range selection: the value a b-bit grid must cover, from the max, a percentile or an MSE search -------------

RangeMethod = Literal["max", "percentile", "mse"]
RANGE_METHODS: tuple[str, ...] = ("max", "percentile", "mse")
# MSE search candidates: DFP tries this many extra fractional bits beyond the no-clip fl; affine shrinks the range.
MSE_EXTRA_FRAC_BITS = 4
MSE_SHRINK_FACTORS = np.linspace(0.3, 1.0, 36)


def channel_rows(x: np.ndarray, axis: int | None) -> np.ndarray:
    """x as a 2-D array with one row per channel along `axis` (one row for the whole tensor when axis is None)."""
    x = np.asarray(x)
    if axis is None:
        return x.reshape(1, -1)
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def _per_channel(values: np.ndarray, axis: int | None) -> float | np.ndarray:
    return float(values[0]) if axis is None else values


def _broadcast_channel(values: np.ndarray | float, ndim: int, axis: int | None) -> np.ndarray | float:
    """Shape per-channel values so that they broadcast against a tensor of rank ndim along `axis`."""
    if axis is None:
        return values
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(values).reshape(shape)


def abs_range(
    x: np.ndarray, *, axis: int | None = None, method: str = "max", percentile: float = 99.99
) -> float | np.ndarray:
    """max|x| (method "max") or the given percentile of |x|, per tensor or per channel along `axis`.

    "mse" is not a closed form: it starts from the max and is refined by `dfp_frac_length` / `symmetric_scale`.
    """
    rows = np.abs(channel_rows(x, axis)).astype(np.float64)
    if rows.shape[1] == 0:
        return _per_channel(np.zeros(rows.shape[0]), axis)
    if method == "percentile":
        return _per_channel(np.percentile(rows, percentile, axis=1), axis)
    return _per_channel(rows.max(axis=1), axis)


def _mse_per_channel(x: np.ndarray, xq: np.ndarray, axis: int | None) -> np.ndarray:
    diff = channel_rows(np.asarray(x, dtype=np.float64) - xq, axis)
    return np.mean(diff * diff, axis=1) if diff.shape[1] else np.zeros(diff.shape[0])


def dfp_frac_length(
    x: np.ndarray,
    bits: int,
    *,
    axis: int | None = None,
    method: str = "max",
    percentile: float = 99.99,
    signed: bool = True,
) -> int | np.ndarray:
    """Fractional length of a b-bit DFP grid for x, per tensor (int) or per channel along `axis` (int64 array).

    max: the finest fl that does not clip (frac_length of max|x|). percentile: the same for a percentile of |x|
    (outliers clip). mse: among fl_max .. fl_max + MSE_EXTRA_FRAC_BITS, the fl with the least squared error.
    Example: x = [0.5, -0.25], bits = 8 -> max|x| = 0.5, 0.5 * 2^8 = 128 > 127, so fl = 7 (step 1/128).
    """
    fl = np.atleast_1d(frac_length(abs_range(x, axis=axis, method=method, percentile=percentile), bits, signed))
    if method == "mse":
        base = fl.copy()
        best = np.full(base.shape, np.inf)
        for extra in range(MSE_EXTRA_FRAC_BITS + 1):
            candidate = base + extra
            step = _broadcast_channel(candidate if axis is not None else candidate[0], np.ndim(x), axis)
            err = _mse_per_channel(x, fake_quantize_dfp(x, bits, step, signed).astype(np.float64), axis)
            better = err < best
            fl = np.where(better, candidate, fl)
            best = np.where(better, err, best)
    return int(fl[0]) if axis is None else fl.astype(np.int64)


def quantize_symmetric(x: np.ndarray, bits: int, scale: float | np.ndarray, signed: bool = True) -> np.ndarray:
    """Integer codes round(x / scale), saturated to the symmetric b-bit range. `scale` broadcasts against x."""
    lo = -qmax(bits, signed) if signed else 0
    q = np.rint(np.asarray(x, dtype=np.float64) / np.asarray(scale, dtype=np.float64))
    return np.clip(q, lo, qmax(bits, signed)).astype(np.int64)


def fake_quantize_symmetric(x: np.ndarray, bits: int, scale: float | np.ndarray, signed: bool = True) -> np.ndarray:
    return (quantize_symmetric(x, bits, scale, signed) * np.asarray(scale, dtype=np.float64)).astype(np.float32)


def symmetric_scale(
    x: np.ndarray,
    bits: int,
    *,
    axis: int | None = None,
    method: str = "max",
    percentile: float = 99.99,
    signed: bool = True,
) -> float | np.ndarray:
    """Real-valued scale of a symmetric b-bit grid (zero point 0): range / qmax, range from max, percentile or MSE.

    mse scans range · MSE_SHRINK_FACTORS and keeps, per channel, the factor with the least squared error.
    An all-zero channel gets scale 1 (any scale is exact for it). Returned as float32-representable values.
    """
    top = np.atleast_1d(np.asarray(abs_range(x, axis=axis, method=method, percentile=percentile), dtype=np.float64))
    top = np.where(top > 0, top, qmax(bits, signed))
    scale = top / qmax(bits, signed)
    if method == "mse":
        base = scale.copy()
        best = np.full(base.shape, np.inf)
        for factor in MSE_SHRINK_FACTORS:
            candidate = base * factor
            step = _broadcast_channel(candidate if axis is not None else candidate[0], np.ndim(x), axis)
            err = _mse_per_channel(x, fake_quantize_symmetric(x, bits, step, signed).astype(np.float64), axis)
            better = err < best
            scale = np.where(better, candidate, scale)
            best = np.where(better, err, best)
    scale = scale.astype(np.float32).astype(np.float64)
    return float(scale[0]) if axis is None else scale


def fake_quantize_affine(
    x: np.ndarray, scale: float, zero_point: int, bits: int = 8, signed: bool = False
) -> np.ndarray:
    """What QuantizeLinear followed by DequantizeLinear computes (round half to even, saturate)."""
    qlo, qhi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    q = np.clip(np.rint(np.asarray(x, dtype=np.float64) / scale) + zero_point, qlo, qhi)
    return ((q - zero_point) * scale).astype(np.float32)


def affine_range(
    x: np.ndarray, *, method: str = "max", percentile: float = 99.99, bits: int = 8, signed: bool = False
) -> tuple[float, float]:
    """[lo, hi] for an affine activation grid: min/max, symmetric percentiles, or the MSE-best shrink of min/max."""
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    if flat.size == 0:
        return 0.0, 0.0
    if method == "percentile":
        return float(np.percentile(flat, 100.0 - percentile)), float(np.percentile(flat, percentile))
    lo, hi = float(flat.min()), float(flat.max())
    if method != "mse":
        return lo, hi
    best, best_range = np.inf, (lo, hi)
    for factor in MSE_SHRINK_FACTORS:
        scale, zero_point = affine_params(lo * factor, hi * factor, bits, signed)
        err = float(np.mean((flat - fake_quantize_affine(flat, scale, zero_point, bits, signed)) ** 2))
        if err < best:
            best, best_range = err, (lo * factor, hi * factor)
    return best_range


def relative_error(x: np.ndarray, x_quantized: np.ndarray) -> float:
    """‖x − x_q‖ / ‖x‖ (root-mean-square error relative to the signal; 0 for an all-zero x)."""
    x = np.asarray(x, dtype=np.float64)
    norm = float(np.sqrt(np.sum(x * x)))
    if norm == 0.0:
        return 0.0
    return float(np.sqrt(np.sum((x - np.asarray(x_quantized, dtype=np.float64)) ** 2)) / norm)


# --- Quantization grids for weights and activations -----------------------------------------------------------------

ScaleKind = Literal["dfp", "affine"]


@dataclass
class RangeObserver:
    """Calibration statistics of one activation: exact min/max over every batch, plus a seeded subsample.

    Percentile and MSE searches run on the subsample (at most `per_batch` values kept from each batch); the exact
    extremes are appended to it, so "max" and the MSE search's starting point never miss the true range.
    """

    low: float = math.inf
    high: float = -math.inf
    samples: list[np.ndarray] = field(default_factory=list)

    def add(self, values: np.ndarray, per_batch: int, rng: np.random.Generator) -> None:
        flat = np.asarray(values, dtype=np.float32).reshape(-1)
        if flat.size == 0:
            return
        self.low, self.high = min(self.low, float(flat.min())), max(self.high, float(flat.max()))
        if flat.size > per_batch:
            flat = rng.choice(flat, per_batch, replace=False)
        self.samples.append(flat)

    def values(self) -> np.ndarray:
        extremes = [np.array([self.low, self.high], dtype=np.float32)] if self.low <= self.high else []
        return np.concatenate([*self.samples, *extremes, np.zeros(0, np.float32)])


@dataclass(frozen=True)
class ActivationGrid:
    """An 8-bit activation grid as QuantizeLinear sees it: x ≈ (q − zero_point) · scale, q of `dtype`."""

    dtype: Literal["uint8", "int8"]
    scale: float
    zero_point: int
    frac_length: int | None
    error: float


@dataclass(frozen=True)
class WeightGrid:
    """Symmetric weight codes (zero point 0) with one scale per tensor (axis None) or per channel along `axis`."""

    codes: np.ndarray
    scale: np.ndarray
    axis: int | None
    frac_length: np.ndarray | None
    error: float


def dfp_activation_roundtrip(values: np.ndarray, fl: int, signed: bool) -> np.ndarray:
    """What QuantizeLinear/DequantizeLinear do with scale 2^-fl: int8 saturates at -128..127, uint8 at 0..255."""
    lo, hi = (-128, 127) if signed else (0, 255)
    return (np.clip(np.rint(np.asarray(values, np.float64) * 2.0**fl), lo, hi) * 2.0**-fl).astype(np.float32)


def activation_grid(
    values: np.ndarray, kind: ScaleKind, *, method: str = "max", percentile: float = 99.99
) -> ActivationGrid:
    """The 8-bit grid for calibration values of one activation.

    dfp: zero point 0, scale 2^-fl; uint8 when no value is negative (e.g. after ReLU), else int8.
    affine: uint8 with a zero point over [lo, hi] from min/max, percentiles or the MSE-best shrink.
    `method` is "max" (min/max), "percentile" or "mse".
    """
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    if kind == "affine":
        lo, hi = affine_range(values, method=method, percentile=percentile)
        scale, zero_point = affine_params(lo, hi, 8, signed=False)
        scale = float(np.float32(scale))
        restored = fake_quantize_affine(values, scale, zero_point, 8)
        return ActivationGrid("uint8", scale, zero_point, None, relative_error(values, restored))
    signed = bool(values.size) and float(values.min()) < 0.0
    fl = dfp_frac_length(values, 8, method=method, percentile=percentile, signed=signed)
    restored = dfp_activation_roundtrip(values, fl, signed)
    return ActivationGrid("int8" if signed else "uint8", float(2.0**-fl), 0, fl, relative_error(values, restored))


def weight_grid(
    w: np.ndarray,
    bits: int,
    kind: ScaleKind,
    *,
    axis: int | None = None,
    method: str = "max",
    percentile: float = 99.99,
) -> WeightGrid:
    """Symmetric b-bit codes of a weight: dfp (scale 2^-fl, exact in float32) or affine (real scale).

    Example: w = [[0.5, -0.25], [0.1, 0.0]], bits 8, dfp, axis 0 -> fl = [7, 10], codes [[64, -32], [102, 0]].
    """
    w = np.asarray(w, dtype=np.float64)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    if kind == "dfp":
        fl = np.atleast_1d(dfp_frac_length(w, bits, axis=axis, method=method, percentile=percentile))
        codes = quantize_dfp(w, bits, fl.reshape(shape) if axis is not None else int(fl[0]))
        scale = np.exp2(-fl.astype(np.float64))
    else:
        fl = None
        scale = np.atleast_1d(symmetric_scale(w, bits, axis=axis, method=method, percentile=percentile))
        codes = quantize_symmetric(w, bits, scale.reshape(shape) if axis is not None else scale[0])
    restored = codes * (scale.reshape(shape) if axis is not None else scale[0])
    return WeightGrid(codes.astype(np.int8), scale.astype(np.float32), axis, fl, relative_error(w, restored))


# --- Sign-magnitude DFP: the bit-slice L1 authors' format (methods.md §4) -------------------------------------------
#
# Scale exponent s = ceil(log2 max|w|) per tensor (or per channel), step 2^(s - m) for an m-bit magnitude, codes
# q = round(w / step) with |q| <= 2^m: sign plus magnitude, the magnitude cut into m / c cells of c bits on the
# positive or negative crossbar array. Training (the authors' FIX_AUTO forward) lets |q| reach 2^m, where |w|
# lies within half a step of 2^s; that value needs an (m + 1)-th bit, so deployment saturates it at 2^m - 1.
# Toy example, m = 8, w = [0.3, -0.1, 0.5]: s = ceil(log2 0.5) = -1, step 2^-9, q = [154, -51, 256] in training,
# [154, -51, 255] deployed.

MAGNITUDE_EPS = 1e-5  # the authors' floor on max|w| before the log (nics_fix_pt RANGE_MAX)


def magnitude_exponent(max_abs: float | np.ndarray) -> int | np.ndarray:
    """s = ceil(log2(max(max_abs, 1e-5))) elementwise: the authors' scale exponent (|w| <= 2^s)."""
    m = np.maximum(np.asarray(max_abs, dtype=np.float64), MAGNITUDE_EPS)
    s = np.ceil(np.log2(m)).astype(np.int64)
    return int(s) if s.ndim == 0 else s


def magnitude_frac_length(exponent: int | np.ndarray, magnitude_bits: int) -> int | np.ndarray:
    """fl with step 2^-fl = 2^(s - magnitude_bits), the DequantizeLinear scale of a sign-magnitude weight."""
    fl = magnitude_bits - np.asarray(exponent, dtype=np.int64)
    return int(fl) if fl.ndim == 0 else fl


def quantize_magnitude(
    x: np.ndarray, magnitude_bits: int, exponent: int | np.ndarray, *, deploy: bool = True
) -> np.ndarray:
    """Sign-magnitude codes round(x / 2^(s - m)) (half to even, like torch.round), clipped to ±(2^m - 1) when
    deployed or to the authors' training range ±2^m. `exponent` broadcasts against x."""
    fl = magnitude_frac_length(exponent, magnitude_bits)
    limit = (1 << magnitude_bits) - (1 if deploy else 0)
    q = np.rint(np.asarray(x, dtype=np.float64) * np.exp2(fl))
    return np.clip(q, -limit, limit).astype(np.int64)


def magnitude_digits(codes: np.ndarray, magnitude_bits: int, cell_bits: int) -> np.ndarray:
    """The authors' slices of |q|, least significant first, shape (S, *codes.shape), S = ceil(m / c).

    Each slice is floor((|q| - higher slices) / 2^(c·k)); the top slice is not masked, so the training edge
    |q| = 2^m gives a top digit of 2^(m - c·(S-1)) (4 for m = 8, c = 2), as in their code.
    """
    x = np.abs(np.asarray(codes, dtype=np.int64))
    count = num_slices(magnitude_bits, cell_bits)
    digits = np.zeros((count, *x.shape), dtype=np.int64)
    rest = x.copy()
    for k in range(count - 1, -1, -1):
        digits[k] = rest >> (cell_bits * k)
        rest -= digits[k] << (cell_bits * k)
    return digits


def magnitude_grid(w: np.ndarray, magnitude_bits: int, *, axis: int | None = None, method: str = "max",
                   percentile: float = 99.99) -> WeightGrid:
    """Deployed sign-magnitude codes (int16 container) of a weight, per tensor or per channel along `axis`.

    The range is max|w| (the authors' rule), a percentile of |w|, or, for "mse", the exponent among
    s_max, s_max - 1, ..., s_max - MSE_EXTRA_FRAC_BITS with the least squared error.
    Example: w = [[0.3, -0.1], [0.5, 0.02]], m = 8, per tensor -> s = -1, fl = 9, codes [[154, -51], [255, 10]].
    """
    w = np.asarray(w, dtype=np.float64)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    top = np.atleast_1d(abs_range(w, axis=axis, method="max" if method == "mse" else method, percentile=percentile))
    exponent = np.atleast_1d(magnitude_exponent(top))
    candidates = [exponent - e for e in range(MSE_EXTRA_FRAC_BITS + 1)] if method == "mse" else [exponent]
    best, chosen = np.full(exponent.shape, np.inf), exponent
    for candidate in candidates:
        fitted = candidate.reshape(shape) if axis is not None else int(candidate[0])
        restored = quantize_magnitude(w, magnitude_bits, fitted) * np.exp2(-magnitude_frac_length(fitted,
                                                                                                   magnitude_bits))
        err = _mse_per_channel(w, restored, axis)
        chosen, best = np.where(err < best, candidate, chosen), np.minimum(err, best)
    fl = np.atleast_1d(magnitude_frac_length(chosen, magnitude_bits))
    codes = quantize_magnitude(w, magnitude_bits, chosen.reshape(shape) if axis is not None else int(chosen[0]))
    scale = np.exp2(-fl.astype(np.float64))
    restored = codes * (scale.reshape(shape) if axis is not None else scale[0])
    return WeightGrid(codes.astype(np.int16), scale.astype(np.float32), axis, fl, relative_error(w, restored))


# --- Bit-slice statistics on a crossbar-ordered weight matrix ------------------------------------------------------


def slice_max_values(bits: int, cell_bits: int, sign: SignMode = "differential") -> list[int]:
    """The largest value each slice can hold, least significant first.

    differential: magnitudes up to qmax(bits) = 2^(b-1) - 1; offset: unsigned codes up to 2^b - 1. A top slice
    that holds fewer than cell_bits bits has a smaller maximum (int8, 2-bit cells: [3, 3, 3, 1]).
    """
    top = qmax(bits) if sign == "differential" else (1 << bits) - 1
    count = num_slices(bits - 1 if sign == "differential" else bits, cell_bits)
    return [min((1 << cell_bits) - 1, top >> (cell_bits * s)) for s in range(count)]


def column_sums(slices: np.ndarray, rows: int) -> np.ndarray:
    """Σ over each crossbar tile's rows of every slice cell.

    slices: (S, P, K, M) cell values — S slices, P polarity arrays (2 differential, 1 offset), K crossbar rows
    (the reduction dimension), M columns. K is cut into ceil(K / rows) tiles of `rows` rows (the last one
    zero-padded). Returns int64 (S, P, tiles, M): the analog sum one column of one tile carries when every
    input digit is 1.
    """
    s_count, polarities, k, m = slices.shape
    tiles = max(1, math.ceil(k / rows))
    padded = np.zeros((s_count, polarities, tiles * rows, m), dtype=np.int64)
    padded[:, :, :k] = slices
    return padded.reshape(s_count, polarities, tiles, rows, m).sum(axis=3)


def adc_bits_needed(column_sum: int | np.ndarray, input_bits_per_cycle: int) -> int | np.ndarray:
    """ADC bits for no saturation on a column whose cells sum to column_sum, for any input digits (elementwise)."""
    peak = np.asarray(column_sum, dtype=np.int64) * ((1 << input_bits_per_cycle) - 1)
    bits = np.maximum(1, np.ceil(np.log2(peak.astype(np.float64) + 1.0))).astype(np.int64)
    return int(bits) if bits.ndim == 0 else bits
