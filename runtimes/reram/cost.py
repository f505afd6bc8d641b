"""Energy, latency and area from event counts, with ISAAC-derived unit costs (reram-model.md §3.2, §3.4).

Unit values (32 nm ISAAC, per-unit numbers as in puma-simulator include/constants.py and MNSIM ADC.py):
ADC 2 mW at 1.28 GS/s = 1.5625 pJ per 8-bit conversion, scaled linearly (0.1953 pJ per bit) or, with
adc_energy=exp, as 1.5625·2^(b−8) pJ; DAC 4 mW / 1024 × 100 ns = 0.390625 pJ per driven row per cycle (a zero
input digit drives nothing); array 0.3 mW × 100 ns = 30 pJ per read; sample-and-hold 10 µW / 1024 × 100 ns per
column sample; shift-and-add 0.2 mW / (8 × 1.28 GS/s) per ADC code; digital add 0.05 mW at 1.2 GHz (row-tile,
zero-point and offset merges). Worked example: one full 128×128 array read = 200 + 50 + 30 + 2.5 + 0.125 =
282.625 pJ (ADC 70.8 %). Areas: ADC 0.0012 mm², array 25 µm², DAC 0.166 µm² per row, S&H 0.039 µm² per column,
S&A 60 µm² per unit shared by two arrays; optional ISAAC tile overhead 40.9 mW and 0.215 mm² per 96 arrays.
ISAAC gives the ADC area at 8 bits only; at other resolutions it is scaled like the energy (adc_energy=linear:
0.0012·b/8 mm², exp: 0.0012·2^(b−8) mm²), an assumption that matters only for per-slice resolutions below 8.
"""

from __future__ import annotations

import math

from runtimes.reram.config import ReramOptions
from runtimes.reram.crossbar import Counts

ADC_PJ_8BIT = 2.0 / 1.28  # 2 mW / 1.28 GS/s
DAC_PJ = 4.0 / 1024 * 100  # µW·ns per row-cycle -> pJ (4 mW over 8 × 128 DACs, 100 ns)
ARRAY_PJ = 0.3 * 100  # 0.3 mW × 100 ns
SAMPLE_HOLD_PJ = 10e-3 / 1024 * 100
SHIFT_ADD_PJ = 0.2 / (8 * 1.28)
DIGITAL_ADD_PJ = 0.05 / 1.2
ADC_MM2 = 0.0012
ARRAY_MM2 = 25e-6
DAC_MM2 = 0.166e-6
SAMPLE_HOLD_MM2 = 0.039e-6
SHIFT_ADD_MM2 = 60e-6 / 2
TILE_MW, TILE_MM2, ARRAYS_PER_TILE = 40.9, 0.215, 96

SOURCE = "ISAAC (ISCA'16) unit costs via puma-simulator constants.py; reram-model.md §3.2"


def adc_energy_pj(bits: int, model: str) -> float:
    if model == "exp":
        return ADC_PJ_8BIT * 2.0 ** (bits - 8)
    return ADC_PJ_8BIT * bits / 8


def adc_area_mm2(bits: int, model: str) -> float:
    """Area of one ADC of `bits` bits: ISAAC's 8-bit 0.0012 mm², scaled with the energy model (module docstring)."""
    if model == "exp":
        return ADC_MM2 * 2.0 ** (bits - 8)
    return ADC_MM2 * bits / 8


def energy_pj(counts: Counts, adc_bits: list[int], options: ReramOptions, latency_ns: float, arrays: int) -> dict:
    """Energy by component for the counted events. adc_bits per slice (an ideal ADC is costed at full bits)."""
    adc = sum(int(n) * adc_energy_pj(b, options.adc_energy) for n, b in zip(counts.conversions, adc_bits, strict=True))
    conversions = int(counts.conversions.sum())
    parts = {
        "adc": adc,
        "dac": counts.dac_drives * DAC_PJ,
        "array": counts.array_reads * ARRAY_PJ,
        "sample_hold": conversions * SAMPLE_HOLD_PJ,
        "shift_add": conversions * SHIFT_ADD_PJ,
        "digital_add": counts.digital_adds * DIGITAL_ADD_PJ,
    }
    if options.tile_overhead:
        parts["tile_overhead"] = math.ceil(arrays / ARRAYS_PER_TILE) * TILE_MW * latency_ns
    return parts


def latency_ns(counts: Counts, reads_per_tile: int, options: ReramOptions) -> float:
    """Vectors one after another, all arrays of a layer in parallel: N · T · ⌈rows used / p⌉ · t_cycle."""
    return counts.vectors * counts.cycles * reads_per_tile * options.t_cycle_ns


def area_mm2(arrays: int, adc_units: int, options: ReramOptions, adc_bits: list[int] | None = None) -> float:
    """Arrays with their DACs, S&H and S&A, plus ADCs: adc_units split evenly over the slices of adc_bits (one
    resolution per slice; None: every ADC at 8 bits)."""
    per_array = ARRAY_MM2 + options.rows * DAC_MM2 + options.cols * SAMPLE_HOLD_MM2 + SHIFT_ADD_MM2
    area = arrays * per_array + adc_area_total(adc_units, adc_bits, options)
    if options.tile_overhead:
        area += math.ceil(arrays / ARRAYS_PER_TILE) * TILE_MM2
    return area


def adc_area_total(adc_units: int, adc_bits: list[int] | None, options: ReramOptions) -> float:
    if not adc_bits:
        return adc_units * ADC_MM2
    return adc_units / len(adc_bits) * sum(adc_area_mm2(b, options.adc_energy) for b in adc_bits)


def summarize(parts: dict[str, float]) -> dict[str, float]:
    total = sum(parts.values())
    return {**{k: round(v, 6) for k, v in parts.items()}, "total": round(total, 6)}
