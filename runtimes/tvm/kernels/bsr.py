"""Block-sparse GEMM: Y[j, n] = epilogue(sum over nonzero blocks of W[n, k] * X[j, k]), W in BSR form.

W is seen as [out, in] (Gemm weight rows, MatMul weight columns, conv filters flattened in ONNX order
(c, kh, kw)) and cut into blocks of bs_r output rows x bs_c input columns. Only nonzero blocks are stored:
`data[nnzb, bs_c, bs_r]` (each block transposed so that its bs_r output rows are contiguous: they are the vector
lanes), `offsets[nnzb, bs_c]` (int32: where each of the block's columns sits in X, relative to a row's base),
`indptr[row blocks + 1]`. Addressing X through per-column offsets lets the same kernel read a plain matrix
(offset = column) or the implicit im2col of a padded NHWC image (offset = (kh * W + kw) * C + c), so sparse
convolutions need no im2col buffer either.

The loops carry the schedule (the block loop is data dependent, so this is TVMScript, not TE): a register tile
of mr rows x bs_r lanes, unrolled over the block's columns, parallel over row tiles or over block rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from runtimes.tvm.kernels.epilogue import Epilogue


@dataclass(frozen=True)
class BlockShape:
    rows: int  # consecutive output channels in a block (the vector lanes)
    cols: int  # consecutive input elements in a block

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"

    @classmethod
    def parse(cls, text: str) -> BlockShape:
        rows, _, cols = text.lower().partition("x")
        return cls(int(rows), int(cols))


@dataclass(frozen=True)
class BsrMatrix:
    """W[out, in] in BSR form, columns not yet mapped to X offsets."""

    block: BlockShape
    out_features: int
    in_features: int
    data: np.ndarray  # [nnzb, bs_c, bs_r] float32
    block_cols: np.ndarray  # [nnzb] int: block column index
    indptr: np.ndarray  # [row blocks + 1] int32

    @property
    def nnzb(self) -> int:
        return len(self.block_cols)

    def offsets(self, column_offset: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """[nnzb, bs_c] int32 X offsets; columns past the matrix (zero padding) point at offset 0."""
        columns = self.block_cols[:, None] * self.block.cols + np.arange(self.block.cols)[None, :]
        inside = columns < self.in_features
        result = np.where(inside, column_offset(np.minimum(columns, self.in_features - 1)), 0)
        return result.astype(np.int32)


def _blocked(w: np.ndarray, block: BlockShape) -> np.ndarray:
    """W[out, in] zero padded and viewed as [row blocks, bs_r, col blocks, bs_c]."""
    out, inp = w.shape
    rows = -(-out // block.rows) * block.rows
    cols = -(-inp // block.cols) * block.cols
    padded = np.zeros((rows, cols), dtype=np.float32)
    padded[:out, :inp] = w
    return padded.reshape(rows // block.rows, block.rows, cols // block.cols, block.cols)


def block_density(w: np.ndarray, block: BlockShape) -> float:
    """Fraction of blocks with at least one nonzero."""
    nonzero = np.any(_blocked(w, block) != 0, axis=(1, 3))
    return float(nonzero.mean())


def to_bsr(w: np.ndarray, block: BlockShape) -> BsrMatrix:
    blocks = _blocked(w, block)
    nonzero = np.any(blocks != 0, axis=(1, 3))  # [row blocks, col blocks]
    if not nonzero.any():  # keep one (zero) block so no buffer is empty
        nonzero[0, 0] = True
    row_blocks, block_cols = np.nonzero(nonzero)
    data = blocks[row_blocks, :, block_cols, :]  # [nnzb, bs_r, bs_c]
    indptr = np.concatenate([[0], np.cumsum(nonzero.sum(axis=1))]).astype(np.int32)
    return BsrMatrix(
        block=block,
        out_features=w.shape[0],
        in_features=w.shape[1],
        data=np.ascontiguousarray(data.transpose(0, 2, 1)),
        block_cols=block_cols,
        indptr=indptr,
    )


@dataclass(frozen=True)
class BsrKernelShape:
    rows: int  # rows of Y (batch rows, or output pixels)
    x_size: int  # elements of the flat X buffer
    out_features: int
    block: BlockShape
    nnzb: int
    mr: int  # rows per register tile
    rows_outer: bool  # parallel over row tiles (weights reused from L1) instead of over block rows


def bsr_gemm(shape: BsrKernelShape, epilogue: Epilogue, row_base: Callable):
    """PrimFunc(X[x_size], data, offsets, indptr, bias[N], [residual[rows, N]], Y[rows, N]).

    row_base(j) gives the flat X index where row j starts; bias is always passed (zeros when the layer has none).
    """
    from tvm.script import tirx as T

    s = shape
    bs_r, bs_c, mr, n_out = s.block.rows, s.block.cols, s.mr, s.out_features
    row_blocks = -(-n_out // bs_r)
    row_tiles = s.rows // mr
    ragged = n_out % bs_r != 0
    epilogue = Epilogue(bias=True, residual=epilogue.residual, relu=epilogue.relu)

    @T.macro
    def tile(X, data, offsets, indptr, bias, residual, Y, nb, io):
        acc = T.alloc_buffer((mr, bs_r), "float32", scope="local")
        for ii in T.unroll(mr):
            for r in T.vectorized(bs_r):
                acc[ii, r] = T.float32(0)
        for b in range(indptr[nb], indptr[nb + 1]):
            for c in T.unroll(bs_c):
                for ii in T.unroll(mr):
                    for r in T.vectorized(bs_r):
                        acc[ii, r] = acc[ii, r] + data[b, c, r] * X[row_base(io * mr + ii) + offsets[b, c]]
        for ii in T.unroll(mr):
            for r in T.vectorized(bs_r):
                if ragged:
                    if nb * bs_r + r < n_out:
                        Y[io * mr + ii, nb * bs_r + r] = epilogue.apply(
                            acc[ii, r], io * mr + ii, nb * bs_r + r, bias, residual
                        )
                else:
                    Y[io * mr + ii, nb * bs_r + r] = epilogue.apply(
                        acc[ii, r], io * mr + ii, nb * bs_r + r, bias, residual
                    )

    @T.macro
    def loops(X, data, offsets, indptr, bias, residual, Y):
        if s.rows_outer:
            for io in T.parallel(row_tiles):
                for nb in range(row_blocks):
                    tile(X, data, offsets, indptr, bias, residual, Y, nb, io)
        else:
            for nb in T.parallel(row_blocks):
                for io in range(row_tiles):
                    tile(X, data, offsets, indptr, bias, residual, Y, nb, io)

    if epilogue.residual:

        @T.prim_func
        def bsr_residual(
            X: T.Buffer((s.x_size,), "float32"),
            data: T.Buffer((s.nnzb, bs_c, bs_r), "float32"),
            offsets: T.Buffer((s.nnzb, bs_c), "int32"),
            indptr: T.Buffer((row_blocks + 1,), "int32"),
            bias: T.Buffer((n_out,), "float32"),
            residual: T.Buffer((s.rows, n_out), "float32"),
            Y: T.Buffer((s.rows, n_out), "float32"),
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            loops(X, data, offsets, indptr, bias, residual, Y)

        return bsr_residual

    @T.prim_func
    def bsr(
        X: T.Buffer((s.x_size,), "float32"),
        data: T.Buffer((s.nnzb, bs_c, bs_r), "float32"),
        offsets: T.Buffer((s.nnzb, bs_c), "int32"),
        indptr: T.Buffer((row_blocks + 1,), "int32"),
        bias: T.Buffer((n_out,), "float32"),
        Y: T.Buffer((s.rows, n_out), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        loops(X, data, offsets, indptr, bias, None, Y)

    return bsr
