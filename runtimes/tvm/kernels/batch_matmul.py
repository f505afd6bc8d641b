"""Batched matmul of two activations (attention scores and mixing): Y[b, m, n] = sum_k A[b, m, k] * B[b, k, n].

Neither operand is constant, so nothing is prepacked: B's rows are already contiguous along n, which is the
vectorized axis of the register tile. Batches and row tiles run in parallel.
"""

from __future__ import annotations

from runtimes.tvm.kernels.dense import build_gemm
from runtimes.tvm.kernels.epilogue import Epilogue
from runtimes.tvm.kernels.tiles import GemmTile


def batch_tile(tile: GemmTile, cols: int) -> GemmTile:
    """B is not padded, so the column tile must divide the column count."""
    from dataclasses import replace

    bn = tile.bn
    while cols % bn:
        bn //= 2
    return replace(tile, bn=bn, cols_outer=False)


def batch_matmul(batch: int, rows: int, reduce: int, cols: int, tile: GemmTile):
    """PrimFunc(A[batch, rows, reduce], B[batch, reduce, cols], Y[batch, rows, cols])."""
    from tvm import te

    a = te.placeholder((batch, rows, reduce), "float32", name="A")
    b = te.placeholder((batch, reduce, cols), "float32", name="B")
    k = te.reduce_axis((0, reduce), name="k")
    acc = te.compute((batch, rows, cols), lambda i, m, n: te.sum(a[i, m, k] * b[i, k, n], axis=k), name="acc")
    return build_gemm(acc, [a, b], rows, cols, tile, Epilogue())
