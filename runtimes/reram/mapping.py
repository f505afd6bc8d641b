"""Laying a K × M weight matrix onto rows × cols crossbars, and turning convolutions into matrix products (im2col).

Row layout: the K weight rows fill tiles of `rows` rows; each tile is read `rows_per_read` rows at a time, and
every read of every column is one ADC conversion. Toy example, K = 200, rows = 128, rows_per_read = 100:
tile 0 holds rows 0..127 and is read as [0..99] and [100..127]; tile 1 holds rows 128..199, read as one group.
The groups are padded to rows_per_read with a row index that points at an all-zero row, so they stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


@dataclass(frozen=True)
class RowGroups:
    """index[g, r]: the weight row read as row r of read group g; value K marks padding (an all-zero row)."""

    index: np.ndarray
    row_tiles: int
    reads_per_tile: int

    @property
    def count(self) -> int:
        return self.index.shape[0]

    @property
    def size(self) -> int:
        return self.index.shape[1]


def row_groups(k: int, rows: int, rows_per_read: int) -> RowGroups:
    groups = []
    for start in range(0, k, rows):
        tile_end = min(k, start + rows)
        groups.extend(range(g, min(tile_end, g + rows_per_read)) for g in range(start, tile_end, rows_per_read))
    size = min(rows_per_read, k)
    index = np.full((len(groups), size), k, dtype=np.int64)
    for g, members in enumerate(groups):
        index[g, : len(members)] = list(members)
    return RowGroups(index, row_tiles=math.ceil(k / rows), reads_per_tile=math.ceil(min(rows, k) / rows_per_read))


def column_tile_widths(m: int, cols: int) -> list[int]:
    """Columns used in each array along M."""
    return [min(cols, m - start) for start in range(0, m, cols)]


def gather_rows(matrix: np.ndarray, groups: RowGroups, axis: int) -> np.ndarray:
    """Reorder axis `axis` (length K) of `matrix` into (G, p) read groups, zero-filled where padded."""
    matrix = np.moveaxis(matrix, axis, -1)
    padded = np.concatenate([matrix, np.zeros((*matrix.shape[:-1], 1), dtype=matrix.dtype)], axis=-1)
    grouped = padded[..., groups.index]
    return np.moveaxis(grouped, (-2, -1), (axis, axis + 1))


@dataclass(frozen=True)
class ConvGeometry:
    """Attributes of an N-d ONNX Conv, with auto_pad resolved per call (it depends on the input size)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...] | None
    auto_pad: str
    groups: int

    def resolve_pads(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        nd = len(self.kernel)
        if self.auto_pad in ("", "NOTSET"):
            return self.pads or (0,) * (2 * nd)
        if self.auto_pad == "VALID":
            return (0,) * (2 * nd)
        begins, ends = [], []
        for size, k, s, d in zip(spatial, self.kernel, self.strides, self.dilations, strict=True):
            out = math.ceil(size / s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            begins.append(small if self.auto_pad == "SAME_UPPER" else large)
            ends.append(large if self.auto_pad == "SAME_UPPER" else small)
        return tuple(begins + ends)


def im2col(x: np.ndarray, geometry: ConvGeometry, pad_value: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """x (N, C, *spatial) -> patches (N·prod(out), C·prod(kernel)) in ONNX weight order (c, k1, k2, ...), and out.

    Padding uses `pad_value`, the input code of real zero (the zero point), so padded taps contribute nothing
    after the zero-point correction, as in QLinearConv.
    """
    nd = len(geometry.kernel)
    pads = geometry.resolve_pads(x.shape[2:])
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)], constant_values=pad_value)
    extent = [(k - 1) * d + 1 for k, d in zip(geometry.kernel, geometry.dilations, strict=True)]
    if any(e > size for e, size in zip(extent, padded.shape[2:], strict=True)):
        raise ValueError(f"kernel extent {extent} exceeds the padded input {list(padded.shape[2:])}")
    windows = sliding_window_view(padded, extent, axis=tuple(range(2, 2 + nd)))
    windows = windows[(slice(None), slice(None))
                      + tuple(slice(None, None, s) for s in geometry.strides)
                      + tuple(slice(None, None, d) for d in geometry.dilations)]
    n, c = x.shape[:2]
    out = windows.shape[2 : 2 + nd]
    order = (0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    patches = windows.transpose(order).reshape(n * math.prod(out), c * math.prod(geometry.kernel))
    return patches, tuple(out)
