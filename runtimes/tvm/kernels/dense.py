"""Dense GEMM: Y[m, n] = epilogue(sum_k X[m, k] * W[k, n]) with W prepacked into column panels.

The weights are constants, so they are packed once at compile time into `Wp[N/bn, K, bn]` (zero padded to a
multiple of bn): each panel is read sequentially while a register tile of mr x bn accumulators is updated.
The same schedule serves convolution (kernels/conv.py), whose reduction is (kh, kw, c) instead of k.
"""

from __future__ import annotations

import numpy as np

from runtimes.tvm.kernels.epilogue import Epilogue
from runtimes.tvm.kernels.tiles import GemmTile

_K_UNROLL = 4


def pack_columns(w_kn: np.ndarray, bn: int) -> np.ndarray:
    """W[K..., N] -> Wp[N/bn, K..., bn], zero padded; K... may be several axes (conv: kh, kw, c)."""
    n = w_kn.shape[-1]
    padded = -(-n // bn) * bn
    w = np.zeros((*w_kn.shape[:-1], padded), dtype=np.float32)
    w[..., :n] = w_kn
    w = w.reshape(*w_kn.shape[:-1], padded // bn, bn)
    return np.ascontiguousarray(np.moveaxis(w, -2, 0))


def dense_matmul(rows: int, reduce: int, cols: int, tile: GemmTile, epilogue: Epilogue):
    """PrimFunc(X[rows, reduce], Wp, [bias[cols]], [residual[rows, cols]], Y[rows, cols])."""
    from tvm import te

    padded = -(-cols // tile.bn) * tile.bn
    x = te.placeholder((rows, reduce), "float32", name="X")
    w = te.placeholder((padded // tile.bn, reduce, tile.bn), "float32", name="W")
    k = te.reduce_axis((0, reduce), name="k")
    acc = te.compute((rows, padded), lambda m, n: te.sum(x[m, k] * w[n // tile.bn, k, n % tile.bn], axis=k), name="acc")
    return build_gemm(acc, [x, w], rows, cols, tile, epilogue)


def build_gemm(acc, inputs: list, rows: int, cols: int, tile: GemmTile, epilogue: Epilogue):
    """Add the epilogue stage to an ([batch...,] rows, padded cols) accumulation `acc`, make the PrimFunc, schedule it.

    Leading batch axes (batched matmul) take no epilogue.
    """
    from tvm import te

    batch = tuple(int(d) for d in acc.shape[:-2])
    bias = te.placeholder((cols,), "float32", name="bias")
    residual = te.placeholder((rows, cols), "float32", name="residual")
    y = te.compute((*batch, rows, cols), lambda *i: epilogue.apply(acc[i], i[-2], i[-1], bias, residual), name="Y")
    params = [*inputs, *([bias] if epilogue.bias else []), *([residual] if epilogue.residual else []), y]
    func = te.create_prim_func(params)
    return schedule_gemm(func, tile, batch_axes=len(batch))


def schedule_gemm(func, tile: GemmTile, batch_axes: int = 0):
    """Register tile mr x bn (unrolled x vectorized) in local scope, reduction loops outside it, parallel tiles."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    acc, y = sch.get_sblock("acc"), sch.get_sblock("Y")
    loops = sch.get_loops(acc)
    batch, (m, n), reduction = loops[:batch_axes], loops[batch_axes : batch_axes + 2], loops[batch_axes + 2 :]
    mo, mi = sch.split(m, [None, tile.mr])
    no, ni = sch.split(n, [None, tile.bn])
    extent = int(sch.get(reduction[-1]).extent)
    unroll_reduction = extent % _K_UNROLL == 0 and extent > _K_UNROLL
    if unroll_reduction:
        ko, ki = sch.split(reduction[-1], [None, _K_UNROLL])
        reduction = [*reduction[:-1], ko, ki]
    outer = [*batch, *([no, mo] if tile.cols_outer else [mo, no])]
    sch.reorder(*outer, *reduction, mi, ni)
    sch.set_scope(acc, 0, "local")
    sch.reverse_compute_at(y, outer[-1])
    ym, yn = sch.get_loops(y)[-2:]
    if unroll_reduction:
        sch.unroll(reduction[-1])
    sch.unroll(mi)
    sch.vectorize(ni)
    sch.unroll(ym)
    sch.vectorize(yn)
    sch.parallel(sch.fuse(*outer))
    sch.decompose_reduction(acc, reduction[0])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
