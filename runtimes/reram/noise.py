"""Device non-idealities (reram-model.md §3.5), all off by default and all seeded.

Conductances are in units of one cell step ΔG = (G_max − G_min)/(2^c − 1): a cell storing k conducts
G_min + k·ΔG, i.e. k + g0 units with g0 = (2^c − 1)/(r − 1) for on/off ratio r (g0 = 0 for an ideal device).
- programming variation: multiplicative N(0, σ) per cell (NeuroSim `--vari`, 0.05 = 5 %);
- stuck-at: SA0 → k = 0 (G_min), SA1 → k = 2^c − 1 (G_max), per cell with probabilities p0, p1 (MNSIM Device_SAF);
- read noise: additive N(0, σ_r · G_max) per cell per read (aihwkit Wan-2022 docstring, σ_r ≈ 0.01), so a column
  sum over active rows gets σ_r · G_max · sqrt(Σ u_t²), i.e. it grows with the square root of the active rows.
"""

from __future__ import annotations

import math

import numpy as np

from runtimes.reram.config import ReramOptions


def leak_units(options: ReramOptions) -> float:
    """g0: the G_min conductance of every cell in units of ΔG (0 for an infinite on/off ratio)."""
    if math.isinf(options.on_off):
        return 0.0
    return ((1 << options.cell_bits) - 1) / (options.on_off - 1)


def program_cells(
    cells: np.ndarray, occupied: np.ndarray, options: ReramOptions, rng: np.random.Generator
) -> np.ndarray:
    """Programmed conductances (float32, units of ΔG) for ideal cell values `cells`.

    occupied: broadcastable mask of cells that exist (padding rows hold no device and stay at 0).
    """
    cell_max = (1 << options.cell_bits) - 1
    values = cells.astype(np.float32)
    p0, p1 = options.stuck_at
    if p0 > 0 or p1 > 0:
        draw = rng.random(values.shape)
        values = np.where(draw < p0, 0.0, values)
        values = np.where((draw >= p0) & (draw < p0 + p1), float(cell_max), values).astype(np.float32)
    values = values + np.float32(leak_units(options))
    if options.variation > 0:
        values = values * (1 + options.variation * rng.standard_normal(values.shape)).astype(np.float32)
        values = np.maximum(values, 0)
    return np.where(occupied, values, 0).astype(np.float32)


def read_noise_sigma(options: ReramOptions) -> float:
    """σ of one cell's read current in ΔG units: σ_r · G_max."""
    return options.read_noise * (((1 << options.cell_bits) - 1) + leak_units(options))


def add_read_noise(
    partial_sums: np.ndarray, drive_power: np.ndarray, sigma: float, rng: np.random.Generator
) -> np.ndarray:
    """partial_sums (..., J) plus N(0, sigma² · drive_power) per conversion; drive_power (...) = Σ over rows of u_t²."""
    scale = (sigma * np.sqrt(drive_power, dtype=np.float32))[..., None]
    return partial_sums + scale * rng.standard_normal(partial_sums.shape, dtype=np.float32)
