"""Register-tile shapes for the GEMM-like kernels, derived from the vector width and the problem shape.

A tile is mr rows x bn columns of accumulators kept in vector registers: bn is a multiple of the vector width
(vectorized), mr rows share each weight vector load. x86 has 16 vector registers (32 with AVX-512); mr*bn/lanes
accumulators plus the weight vectors and one broadcast must fit, or the tile spills and runs at half speed.
"""

from __future__ import annotations

from dataclasses import dataclass

# Weight panels bigger than this stay out of L2 if every row tile sweeps all of them: iterate columns outermost.
_L2_PANEL_BYTES = 256 * 1024


@dataclass(frozen=True)
class GemmTile:
    mr: int  # rows per register tile (unrolled)
    bn: int  # columns per register tile (vectorized), also the packing width of the weights
    cols_outer: bool  # loop over column panels outside the row tiles (weights reused from cache)

    def describe(self) -> str:
        return f"{self.mr}x{self.bn}"


def gemm_tile(rows: int, reduce: int, cols: int, lanes: int) -> GemmTile:
    if rows == 1:
        bn = min(4 * lanes, _round_up(cols, lanes))
        return GemmTile(1, bn, cols_outer=False)
    bn = 2 * lanes if lanes <= 8 else lanes
    bn = min(bn, _round_up(cols, lanes))
    accumulators = 12 if lanes <= 8 else 28
    mr = _largest_divisor(rows, max(1, accumulators * lanes // bn), prefer=(4, 6, 8))
    cols_outer = reduce * _round_up(cols, bn) * 4 > _L2_PANEL_BYTES
    return GemmTile(mr, bn, cols_outer)


def bsr_rows(rows: int, block_rows: int, lanes: int) -> int:
    """Rows of the BSR register tile: each nonzero block's weight vectors are reused across this many rows."""
    if rows == 1:
        return 1
    vectors_per_row = max(1, block_rows // lanes)
    limit = max(1, (12 if lanes <= 8 else 28) // vectors_per_row)
    return _largest_divisor(rows, limit, prefer=(4, 8, 6))


def _largest_divisor(n: int, limit: int, prefer: tuple[int, ...]) -> int:
    for candidate in prefer:
        if candidate <= limit and n % candidate == 0:
            return candidate
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
