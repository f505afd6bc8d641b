"""2-D convolution as a GEMM over an implicit im2col matrix, on NHWC input that is already padded.

Rows are output pixels j = (n, oh, ow), columns output channels, the reduction runs over (kh, kw, c). No im2col
buffer is written: the kernel reads the padded input directly, so the inner loop over c is contiguous, and the
GEMM schedule of kernels/dense.py applies unchanged. Groups, stride and dilation are index arithmetic.
A 1-D convolution is the case H = 1. When the pixel count is not a multiple of the register tile's rows, the
accumulation runs over a few extra rows that recompute the last pixel and are never stored: a full-height tile
everywhere is faster than a tile height that divides the count (286 output frames would otherwise get 2 rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtimes.tvm.kernels.dense import build_gemm
from runtimes.tvm.kernels.epilogue import Epilogue
from runtimes.tvm.kernels.tiles import GemmTile


@dataclass(frozen=True)
class ConvGeometry:
    """A conv2d on padded NHWC input x[batch, padded_h, padded_w, channels] with OHWI weights."""

    batch: int
    padded_h: int
    padded_w: int
    channels: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    @property
    def out_h(self) -> int:
        return (self.padded_h - self.dilation[0] * (self.kernel_h - 1) - 1) // self.stride[0] + 1

    @property
    def out_w(self) -> int:
        return (self.padded_w - self.dilation[1] * (self.kernel_w - 1) - 1) // self.stride[1] + 1

    @property
    def rows(self) -> int:
        """Output pixels: the GEMM's row count."""
        return self.batch * self.out_h * self.out_w

    @property
    def group_channels(self) -> int:
        return self.channels // self.groups

    @property
    def reduce(self) -> int:
        return self.kernel_h * self.kernel_w * self.group_channels

    def pixel(self, j):
        """(n, top row, left column) in the padded input of output pixel j."""
        per_image = self.out_h * self.out_w
        return j // per_image, (j // self.out_w) % self.out_h * self.stride[0], j % self.out_w * self.stride[1]


def pack_conv_weight(w_ohwi: np.ndarray, bn: int) -> np.ndarray:
    """W[O, KH, KW, C/g] -> Wp[O/bn, KH, KW, C/g, bn], zero padded in O."""
    from runtimes.tvm.kernels.dense import pack_columns

    return pack_columns(np.moveaxis(w_ohwi, 0, -1), bn)


def dense_conv2d(geometry: ConvGeometry, tile: GemmTile, epilogue: Epilogue):
    """PrimFunc(Xpad[N, Hp, Wp, C], Wp, [bias[O]], [residual[J, O]], Y[J, O]) with J = N * OH * OW."""
    from tvm import te, tirx

    g = geometry
    bn = tile.bn
    padded = -(-g.out_channels // bn) * bn
    x = te.placeholder((g.batch, g.padded_h, g.padded_w, g.channels), "float32", name="X")
    w = te.placeholder((padded // bn, g.kernel_h, g.kernel_w, g.group_channels, bn), "float32", name="W")
    kh = te.reduce_axis((0, g.kernel_h), name="kh")
    kw = te.reduce_axis((0, g.kernel_w), name="kw")
    c = te.reduce_axis((0, g.group_channels), name="c")
    out_per_group = g.out_channels // g.groups

    def channel(o):
        if g.groups == 1:
            return c
        # padded output channels (o >= O) must still read inside the input
        return tirx.min(o // out_per_group, g.groups - 1) * g.group_channels + c

    def product(j, o):
        n, top, left = g.pixel(j)
        pixel = x[n, top + kh * g.dilation[0], left + kw * g.dilation[1], channel(o)]
        return pixel * w[o // bn, kh, kw, c, o % bn]

    rows = -(-g.rows // tile.mr) * tile.mr

    def accumulate(j, o):
        return te.sum(product(tirx.min(j, g.rows - 1) if rows > g.rows else j, o), axis=[kh, kw, c])

    acc = te.compute((rows, padded), accumulate, name="acc")
    return build_gemm(acc, [x, w], g.rows, g.out_channels, tile, epilogue)
