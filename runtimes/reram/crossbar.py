"""One integer weight matrix on crossbars: bit-serial inputs, sliced weights, per-column ADCs, shift-and-add.

The arithmetic is reram-model.md §3.3. Input codes u (N, K) are fed v bits per cycle (T cycles); weights w (K, M)
are split into S slices of c bits per polarity array; each (cycle, slice, polarity, read group, column) is one
analog partial sum P and one ADC conversion; the ADC codes are shifted and added digitally:
    acc[n, j] = Σ_t Σ_s Σ_g 2^(v·t + c·s) · (A(P⁺) − A(P⁻))
With an ideal device, P is an integer no larger than (2^v − 1) · Σ_rows d_s, so a column whose bound fits
the ADC (granular LSB, no clipping) contributes exactly u · w: that is the fast path. Only the remaining
columns are simulated bit-serially, as a correction A(P) − P added to the exact float64 product (float32
sums of integers below 2^24 and float64 sums below 2^53 are exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from optimizer.quant import adc_bits_for, split_slices
from runtimes.reram.config import ReramOptions
from runtimes.reram.mapping import column_tile_widths, gather_rows, row_groups
from runtimes.reram.noise import add_read_noise, leak_units, program_cells, read_noise_sigma

CHUNK_ELEMENTS = 1 << 22
FLOAT32_EXACT = 1 << 24  # every integer below this is a float32, so sums that stay below it are exact


@dataclass(frozen=True)
class AdcSlice:
    """The ADC of one weight slice. bits = 0 is ideal; LSB = 2^shift cell steps; `clips` saturates at max_code."""

    bits: int
    shift: int
    clips: bool
    signed: bool

    @property
    def ideal(self) -> bool:
        return self.bits == 0

    @property
    def max_code(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def convert(self, partial_sums: np.ndarray) -> tuple[np.ndarray, int]:
        """ADC output in cell-step units and the number of conversions that clipped at full scale."""
        if self.ideal:
            return partial_sums, 0
        codes = np.floor(partial_sums * np.float32(2.0**-self.shift) + np.float32(0.5))
        low = -self.max_code if self.signed else 0
        saturated = 0
        if self.clips:
            saturated = int(np.count_nonzero(codes > self.max_code))
            if self.signed:
                saturated += int(np.count_nonzero(codes < low))
            codes = np.clip(codes, low, self.max_code)
        elif not self.signed:
            codes = np.maximum(codes, 0)
        return codes * np.float32(2.0**self.shift), saturated


@dataclass
class Counts:
    """Events of the runs since the last reset, for the cost model; per-slice arrays are least significant first."""

    vectors: int = 0
    cycles: int = 0
    macs: int = 0
    array_reads: int = 0
    dac_drives: int = 0
    digital_adds: int = 0
    conversions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    saturated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def add(self, other: Counts) -> None:
        self.vectors += other.vectors
        self.cycles = max(self.cycles, other.cycles)
        self.macs += other.macs
        self.array_reads += other.array_reads
        self.dac_drives += other.dac_drives
        self.digital_adds += other.digital_adds
        self.conversions = self.conversions + other.conversions
        self.saturated = self.saturated + other.saturated


class Crossbar:
    """An integer weight matrix w (K, M) programmed on arrays, ready to multiply input codes.

    Toy example: K = 128, M = 1, every w = 127, defaults (2-bit cells, differential): slices 3, 3, 3, 1 on the
    w⁺ arrays and 0 on w⁻; an all-255 input drives every row in each of 8 cycles, P = 384 on the three full
    slices, which an 8-bit granular ADC clips to 255 (24 of 64 conversions), giving 3,454,485 instead of 4,145,280.
    """

    def __init__(self, weight: np.ndarray, options: ReramOptions, rng: np.random.Generator | None = None,
                 weight_bits: int | None = None):
        """weight_bits: signed bits of the codes (default options.weight_bits); widened if a code does not fit."""
        o = options
        self.options = o
        self.weight = np.asarray(weight, dtype=np.int64)
        self.k, self.m = self.weight.shape
        declared = (weight_bits or o.weight_bits) - 1
        self.magnitude_bits = max(declared, int(np.abs(self.weight).max(initial=0)).bit_length())
        storage = "offset" if o.sign == "offset" else "differential"
        slices, self.offset = split_slices(self.weight, self.magnitude_bits + 1, o.cell_bits, storage)
        self.slices, self.physical_planes = slices.shape[:2]
        self.signed = o.sign == "differential_analog"
        self.groups = row_groups(self.k, o.rows, o.rows_per_read)
        physical = gather_rows(slices, self.groups, axis=2)  # (S, planes, G, p, M)
        ideal = physical[:, :1] - physical[:, 1:] if self.signed else physical
        self.cells = ideal.astype(np.float32)
        self.plane_signs = (1, -1) if o.sign == "differential" else (1,)
        digit_max = (1 << o.dac_bits) - 1
        sums = physical.sum(axis=3)  # (S, planes, G, M)
        self.column_bound = digit_max * (sums.max(axis=1, keepdims=True) if self.signed else sums)
        value_bits = self.magnitude_bits + (1 if storage == "offset" else 0)
        self.slice_max = [min((1 << o.cell_bits) - 1, (1 << max(0, value_bits - o.cell_bits * s)) - 1)
                          for s in range(self.slices)]
        self.full_bits = [adc_bits_for(self.groups.size * cell * digit_max) + int(self.signed)
                          for cell in self.slice_max]
        self.weight_f64 = self.weight.astype(np.float64)
        self.programmed = self._program(physical, rng) if o.noisy else None
        self.adc: list[AdcSlice] = []
        self.exact_columns: np.ndarray | None = None

    def _program(self, physical: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        occupied = (self.groups.index < self.k)[None, None, :, :, None]
        cells = program_cells(physical, occupied, self.options, rng or np.random.default_rng(self.options.seed))
        return cells[:, :1] - cells[:, 1:] if self.signed else cells

    @property
    def conversion_planes(self) -> int:
        return self.cells.shape[1]

    @property
    def column_tiles(self) -> list[int]:
        return column_tile_widths(self.m, self.options.cols)

    @property
    def arrays(self) -> int:
        return self.groups.row_tiles * len(self.column_tiles) * self.slices * self.physical_planes

    @property
    def adc_units(self) -> int:
        per_row_tile = sum(math.ceil(w / self.options.adc_cols) for w in self.column_tiles)
        return self.groups.row_tiles * self.slices * self.conversion_planes * per_row_tile

    def bits_needed(self) -> list[int]:
        """Per slice, the ADC bits that no input can saturate (the bit-slice L1 metric, from the stored cells)."""
        return [adc_bits_for(int(self.column_bound[s].max(initial=0))) + int(self.signed) for s in range(self.slices)]

    def configure_adc(self, bits: tuple[int, ...], mode: str, observed_max: list[float] | None = None) -> None:
        """Set each slice's ADC (bits per slice, least significant first) and find the provably exact columns."""
        if len(bits) != self.slices:
            raise ValueError(f"{len(bits)} ADC resolutions for {self.slices} slices")
        self.adc = []
        for s, b in enumerate(bits):
            if b == 0 or mode == "granular":
                self.adc.append(AdcSlice(b, 0, b != 0, self.signed))
            elif mode == "max":
                self.adc.append(AdcSlice(b, max(0, self.full_bits[s] - b), False, self.signed))
            else:
                needed = adc_bits_for(math.ceil(observed_max[s])) + int(self.signed)
                self.adc.append(AdcSlice(b, max(0, needed - b), True, self.signed))
        fits = np.stack([
            np.full(self.column_bound[s].shape, True) if adc.ideal
            else (self.column_bound[s] <= adc.max_code) & (adc.shift == 0)
            for s, adc in enumerate(self.adc)
        ])
        self.exact_columns = fits & self.options.fast_path  # (S, planes, G, M)
        self.simulated_columns = np.flatnonzero(~self.exact_columns.all(axis=(0, 1, 2)))
        chosen = self.cells[..., self.simulated_columns]  # (S, planes, G, p, J)
        self.simulated_cells = np.ascontiguousarray(chosen.transpose(2, 3, 0, 1, 4)).reshape(
            self.groups.count, self.groups.size, -1)
        planes = self.conversion_planes
        self.adc_shift = np.repeat([adc.shift for adc in self.adc], planes)
        limits = [adc.max_code if adc.clips else np.inf for adc in self.adc]
        self.adc_limit = np.repeat(limits, planes).astype(np.float32)

    def matmul(
        self, u: np.ndarray, input_bits: int, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, Counts]:
        """u (N, K) non-negative integer codes below 2^input_bits -> (acc (N, M) float64, counts)."""
        o = self.options
        cycles = math.ceil(input_bits / o.dac_bits)
        n = u.shape[0]
        width = max(self.groups.size, self.m * self.slices * self.conversion_planes)
        chunk = max(1, CHUNK_ELEMENTS // (cycles * self.groups.count * width))
        acc = np.empty((n, self.m), dtype=np.float64)
        saturated = np.zeros(self.slices, dtype=np.int64)
        drives = 0
        for start in range(0, n, chunk):
            block = u[start : start + chunk]
            drives += self._active_digits(block, cycles)
            if self.programmed is not None:
                acc[start : start + chunk] = self._noisy_product(block, cycles, saturated, rng)
            else:
                acc[start : start + chunk] = self._exact_product(block, cycles, saturated)
        return acc, self._counts(n, cycles, drives, saturated)

    def observe(self, u: np.ndarray, input_bits: int) -> np.ndarray:
        """Largest |P| per slice over every conversion of these inputs on ideal cells (for calibrated ADC ranges)."""
        cycles = math.ceil(input_bits / self.options.dac_bits)
        largest = np.zeros(self.slices)
        chunk = max(1, CHUNK_ELEMENTS // (cycles * self.groups.count * max(self.groups.size, self.m)))
        for start in range(0, u.shape[0], chunk):
            digits = self._digits(u[start : start + chunk], cycles)
            for s in range(self.slices):
                for plane in range(self.conversion_planes):
                    partial = np.matmul(digits, self.cells[s, plane])
                    largest[s] = max(largest[s], float(np.abs(partial).max(initial=0)))
        return largest

    def _digits(self, u: np.ndarray, cycles: int) -> np.ndarray:
        """(G, T·n, p) float32 input digits per read group, cycle-major."""
        v, n = self.options.dac_bits, u.shape[0]
        grouped = np.ascontiguousarray(gather_rows(u, self.groups, axis=1).transpose(1, 0, 2))  # (G, n, p)
        digits = np.empty((self.groups.count, cycles * n, self.groups.size), dtype=np.float32)
        for t in range(cycles):
            digits[:, t * n : (t + 1) * n] = (grouped >> (v * t)) & ((1 << v) - 1)
        return digits

    def _cycle_weights(self, cycles: int) -> np.ndarray:
        return np.exp2(self.options.dac_bits * np.arange(cycles, dtype=np.float64))

    def _shift_add(self, codes: np.ndarray, cycles: int, n: int) -> np.ndarray:
        """Σ over read groups and cycles of 2^(v·t) · codes, codes (G, T·n, J) -> (n, J) float64."""
        per_cycle = codes.reshape(codes.shape[0], cycles, n, codes.shape[-1]).sum(axis=0, dtype=np.float64)
        return np.tensordot(self._cycle_weights(cycles), per_cycle, axes=1)

    def _exact_product(self, u: np.ndarray, cycles: int, saturated: np.ndarray) -> np.ndarray:
        """u · w exactly, plus A(P) − P shifted and added for every column the fast path could not prove exact.

        All (slice, polarity) planes of the simulated columns go through one matmul: (G, T·n, p) @ (G, p, S·P·J).
        """
        out = u.astype(np.float64) @ self.weight_f64
        columns = self.simulated_columns
        if columns.size == 0:
            return out
        n, planes = u.shape[0], self.slices * self.conversion_planes
        partial = np.matmul(self._digits(u, cycles), self.simulated_cells)
        partial = partial.reshape(self.groups.count, cycles * n, planes, columns.size)
        difference, clipped = self._adc_error(partial)
        saturated += clipped.reshape(self.slices, -1).sum(axis=1)
        exact_in_float32 = self.groups.count << max(self.full_bits) < FLOAT32_EXACT
        summed = difference[0] if self.groups.count == 1 else difference.sum(
            axis=0, dtype=np.float32 if exact_in_float32 else np.float64)
        per_plane = summed.reshape(cycles, n, planes, columns.size)
        out[:, columns] += np.einsum("tnkj,tk->nj", per_plane, self._plane_weights(cycles))
        return out

    def _adc_error(self, partial: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A(P) − P for integer partial sums (G, T·n, planes, J), written over them; clipped conversions per plane."""
        limit = self.adc_limit[:, None]
        if not self.adc_shift.any():
            under = np.maximum(-limit - partial, 0) if self.signed else None
            over = np.subtract(partial, limit, out=partial)
            np.maximum(over, 0, out=over)
            clipped = np.count_nonzero(over, axis=(0, 1, 3))
            error = np.negative(over, out=over)
            if under is not None:
                clipped += np.count_nonzero(under, axis=(0, 1, 3))
                error += under
            return error, clipped
        lsb = np.exp2(self.adc_shift).astype(np.float32)[:, None]
        codes = np.floor(partial / lsb + np.float32(0.5))
        clipped = np.count_nonzero(codes > limit, axis=(0, 1, 3))
        if self.signed:
            clipped += np.count_nonzero(codes < -limit, axis=(0, 1, 3))
        codes = np.clip(codes, -limit if self.signed else 0, limit)
        return np.subtract(codes * lsb, partial, out=partial), clipped

    def _plane_weights(self, cycles: int) -> np.ndarray:
        """(T, S·planes) float64: 2^(v·t) · 2^(c·s) · polarity sign."""
        per_plane = np.array([sign * float(1 << (self.options.cell_bits * s))
                              for s in range(self.slices) for sign in self.plane_signs], dtype=np.float64)
        return np.outer(self._cycle_weights(cycles), per_plane)

    def _noisy_product(self, u: np.ndarray, cycles: int, saturated: np.ndarray, rng) -> np.ndarray:
        o = self.options
        digits = self._digits(u, cycles)
        sigma = read_noise_sigma(o)
        power = np.square(digits).sum(axis=-1) * (2 if self.signed else 1) if sigma > 0 else None
        out = np.zeros((u.shape[0], self.m), dtype=np.float64)
        for s, adc in enumerate(self.adc):
            for plane, sign in enumerate(self.plane_signs):
                partial = np.matmul(digits, self.programmed[s, plane])
                if power is not None:
                    partial = add_read_noise(partial, power, sigma, rng)
                codes, clipped = adc.convert(partial)
                saturated[s] += clipped
                out += sign * float(1 << (o.cell_bits * s)) * self._shift_add(codes, cycles, u.shape[0])
        if self.offset:
            reference = self.offset + leak_units(o) * sum(1 << (o.cell_bits * s) for s in range(self.slices))
            out -= reference * u.sum(axis=1, dtype=np.float64)[:, None]
        return out

    def _active_digits(self, u: np.ndarray, cycles: int) -> int:
        v = self.options.dac_bits
        return sum(int(np.count_nonzero((u >> (v * t)) & ((1 << v) - 1))) for t in range(cycles))

    def _counts(self, n: int, cycles: int, drives: int, saturated: np.ndarray) -> Counts:
        tiles = len(self.column_tiles)
        per_slice = n * cycles * self.conversion_planes * self.groups.count * self.m
        digital = n * self.m * (self.groups.row_tiles - 1 + (1 if self.offset else 0))
        return Counts(
            vectors=n,
            cycles=cycles,
            macs=n * self.k * self.m,
            array_reads=n * cycles * self.slices * self.physical_planes * self.groups.count * tiles,
            dac_drives=drives * self.slices * self.physical_planes * tiles,
            digital_adds=digital,
            conversions=np.full(self.slices, per_slice, dtype=np.int64),
            saturated=saturated,
        )
