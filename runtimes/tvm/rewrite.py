"""Swap every layer found by layers.py for a `call_tir` to Sculpt's dense or BSR kernel, epilogue included, and
every matmul of two activations for the batched matmul kernel.

Weights are packed at compile time (dense: column panels; BSR: blocks plus X offsets) and enter the module as
constants. The kernels see 2-D operands: matmul inputs are reshaped to [rows, K], conv inputs are padded in
Relax (the pad is scheduled by the fallback rule) and the output [N*OH*OW, O] is reshaped back to NHWC.
A conv1d runs as a conv2d of height 1: its NWC input is viewed as [N, 1, W, C], its output reshaped back to NWC.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtimes.tvm.choice import KernelChoice, choose_kernel
from runtimes.tvm.kernels.batch_matmul import batch_matmul, batch_tile
from runtimes.tvm.kernels.bsr import BlockShape, BsrKernelShape, bsr_gemm, to_bsr
from runtimes.tvm.kernels.conv import ConvGeometry, dense_conv2d, pack_conv_weight
from runtimes.tvm.kernels.dense import dense_matmul, pack_columns
from runtimes.tvm.kernels.epilogue import Epilogue
from runtimes.tvm.kernels.tiles import bsr_rows, gemm_tile
from runtimes.tvm.layers import Layer, find_layers, static_shape
from runtimes.tvm.mutate import rewrite_functions

_ANY_TILE_HEIGHT = 24  # a row count that every preferred tile height (4, 6, 8) divides
_OPAQUE = 8  # relax OpPatternKind kOpaque: FuseOps must not merge hand-scheduled kernels with their neighbours


@dataclass(frozen=True)
class RewriteSettings:
    sparse: str  # auto | always | never
    block: BlockShape | None
    lanes: int


@dataclass
class LayerReport:
    """One row of Session.describe()["layers"]."""

    name: str
    op: str
    gemm: str  # rows x reduce x cols
    kernel: str
    block: str | None
    block_sparsity: float | None
    tile: str
    fused: str
    reason: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Gemm:
    """A layer seen as Y[rows, cols] = X[rows, reduce] @ W[out=cols, in=reduce]^T."""

    rows: int
    reduce: int
    cols: int
    w_out_in: np.ndarray  # the input axis in ONNX order (conv: c, kh, kw), which sparsify's blocks follow
    geometry: ConvGeometry | None  # None for a matmul

    @classmethod
    def of(cls, layer: Layer) -> Gemm:
        if layer.kind == "matmul":
            reduce, cols = layer.weight.shape
            rows = int(np.prod(layer.in_shape[:-1], dtype=np.int64))
            return cls(rows, reduce, cols, layer.weight.T, None)
        n, h, w, c = _nhwc(layer)
        top, left, bottom, right = layer.conv.padding
        o, kh, kw, _ = layer.weight.shape
        geometry = ConvGeometry(
            batch=n, padded_h=h + top + bottom, padded_w=w + left + right, channels=c, out_channels=o,
            kernel_h=kh, kernel_w=kw, stride=layer.conv.strides, dilation=layer.conv.dilation,
            groups=layer.conv.groups,
        )  # fmt: skip
        w_out_in = layer.weight.transpose(0, 3, 1, 2).reshape(o, -1)
        return cls(geometry.rows, geometry.reduce, o, w_out_in, geometry)


@dataclass
class KernelCall:
    func: object  # tirx.PrimFunc
    inputs: list  # Relax args before bias and residual
    tile: str


def rewrite_layers(mod, settings: RewriteSettings, layer_names: list[tuple[str, str, tuple[int, ...]]]):
    """(module with layers swapped for kernels, layer reports, lines about matmul/conv ops left to TVM)."""
    from tvm import relax

    rewriter = _make_rewriter(mod, settings, list(layer_names))
    mod = rewrite_functions(rewriter, mod, before=rewriter.find_layers)
    mod = relax.transform.DeadCodeElimination()(mod)
    return mod, rewriter.reports, rewriter.declined


def _make_rewriter(mod, settings: RewriteSettings, layer_names: list):
    from tvm import relax

    @relax.expr_functor.mutator
    class KernelRewriter(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.reports: list[LayerReport] = []
            self.declined: list[str] = []
            self.by_tail: dict = {}
            self.absorbed: set = set()

        def find_layers(self, func):
            """Collect the function's Gemm/Conv chains before it is visited."""
            layers, declined = find_layers(func)
            self.declined += declined
            self.by_tail = {layer.tail: layer for layer in layers}
            self.absorbed = {var for layer in layers for var in layer.absorbed}

        def visit_var_binding_(self, binding):
            if binding.var in self.absorbed:  # folded into the kernel call emitted at the chain's tail
                return
            layer = self.by_tail.get(binding.var)
            if layer is None:
                super().visit_var_binding_(binding)
                return
            name = _layer_name(layer, layer_names, len(self.reports))
            value = _emit_layer(self, layer, settings, name)
            super().visit_var_binding_(relax.VarBinding(binding.var, value))

        def visit_call_(self, call):
            call = super().visit_call_(call)
            shapes = _activation_matmul_shapes(call)
            return call if shapes is None else _emit_batch_matmul(self, call, shapes, settings)

    return KernelRewriter(mod)


def _layer_name(layer: Layer, names: list, index: int) -> str:
    """The ONNX node this layer came from: the next unclaimed node of the same kind and weight shape."""
    for i, (name, kind, shape) in enumerate(names):
        if kind == layer.kind and shape == layer.weight.shape:
            del names[i]
            return name
    return f"{layer.kind}_{index}"


def _add_kernel(builder, func, name: str):
    # the builder names the function; a "main" symbol left by TE/TVMScript would clash with the Relax entry
    return builder.add_func(func.without_attr("global_symbol").with_attr("op_pattern", _OPAQUE), name)


def _emit_layer(rewriter, layer: Layer, settings: RewriteSettings, name: str):
    """Emit pad/reshapes and the kernel call; returns the value that replaces the chain's tail (NHWC or [.., N])."""
    from tvm import relax

    builder = rewriter.builder_
    gemm = Gemm.of(layer)
    groups = layer.conv.groups if layer.conv else 1
    choice = choose_kernel(
        gemm.w_out_in, gemm.rows, sparse=settings.sparse, lanes=settings.lanes, block=settings.block, groups=groups
    )
    epilogue = Epilogue(bias=layer.bias is not None, residual=layer.residual is not None, relu=layer.relu)
    x = rewriter.visit_expr(layer.x)
    if gemm.geometry is not None:
        x = _padded_nhwc(builder, x, layer)
    if choice.kernel == "bsr":
        call = _bsr_kernel(builder, x, gemm, choice, epilogue, settings)
    else:
        call = _dense_kernel(builder, x, layer, gemm, epilogue, settings)
    args = list(call.inputs)
    if layer.bias is not None:
        args.append(relax.const(layer.bias))
    elif choice.kernel == "bsr":  # the BSR kernel always takes a bias
        args.append(relax.const(np.zeros(gemm.cols, np.float32)))
    if layer.residual is not None:
        args.append(builder.emit(relax.op.reshape(rewriter.visit_expr(layer.residual), [gemm.rows, gemm.cols])))
    gvar = _add_kernel(builder, call.func, f"sculpt_{choice.kernel}_{layer.kind}")
    out = builder.emit(relax.call_tir(gvar, args, relax.TensorType((gemm.rows, gemm.cols), "float32")))
    rewriter.reports.append(
        LayerReport(
            name=name,
            op=layer.kind,
            gemm=f"{gemm.rows}x{gemm.reduce}x{gemm.cols}",
            kernel=choice.kernel,
            block=str(choice.block) if choice.block else None,
            block_sparsity=None if choice.block_sparsity is None else round(choice.block_sparsity, 4),
            tile=call.tile,
            fused=epilogue.describe(),
            reason=choice.reason,
        )
    )
    return relax.op.reshape(out, list(layer.out_shape))


def _nhwc(layer: Layer) -> tuple[int, int, int, int]:
    """The conv input's shape as the kernels see it: NHWC, with H = 1 for a conv1d's NWC input."""
    if layer.kind == "conv1d":
        n, w, c = layer.in_shape
        return n, 1, w, c
    return layer.in_shape


def _padded_nhwc(builder, x, layer: Layer):
    """The conv input padded in Relax, as a 4-D NHWC tensor."""
    from tvm import relax

    top, left, bottom, right = layer.conv.padding
    if layer.kind == "conv1d":
        if left or right:
            x = builder.emit(relax.op.nn.pad(x, [0, 0, left, right, 0, 0]))
        n, w, c = layer.in_shape
        return builder.emit(relax.op.reshape(x, [n, 1, w + left + right, c]))
    if top or left or bottom or right:
        x = builder.emit(relax.op.nn.pad(x, [0, 0, top, bottom, left, right, 0, 0]))
    return x


def _dense_kernel(builder, x, layer: Layer, gemm: Gemm, epilogue: Epilogue, settings: RewriteSettings) -> KernelCall:
    from tvm import relax

    if gemm.geometry is None:
        tile = gemm_tile(gemm.rows, gemm.reduce, gemm.cols, settings.lanes)
        if len(layer.in_shape) != 2:
            x = builder.emit(relax.op.reshape(x, [gemm.rows, gemm.reduce]))
        func = dense_matmul(gemm.rows, gemm.reduce, gemm.cols, tile, epilogue)
        packed = pack_columns(layer.weight, tile.bn)
    else:
        tile = _conv_tile(gemm, settings.lanes)
        if gemm.geometry.groups > 1:
            tile = _grouped_tile(tile, gemm.geometry)
        func = dense_conv2d(gemm.geometry, tile, epilogue)
        packed = pack_conv_weight(layer.weight, tile.bn)
    return KernelCall(func, [x, relax.const(packed)], tile.describe())


def _conv_tile(gemm: Gemm, lanes: int):
    """The conv kernel pads its rows up to the tile height (kernels/conv.py), so a pixel count with no good divisor
    (286 frames: 2 rows, half speed) can take the tile of a nearby count, when that wastes at most 1/8 of the rows.
    """
    exact = gemm_tile(gemm.rows, gemm.reduce, gemm.cols, lanes)
    rounded = gemm_tile(-(-gemm.rows // _ANY_TILE_HEIGHT) * _ANY_TILE_HEIGHT, gemm.reduce, gemm.cols, lanes)
    waste = -gemm.rows % rounded.mr
    return rounded if rounded.mr > exact.mr and waste * 8 <= gemm.rows else exact


def _grouped_tile(tile, geometry: ConvGeometry):
    """Grouped convs vectorize within one group where possible (a vector then reads contiguous input channels)."""
    from dataclasses import replace

    per_group = geometry.out_channels // geometry.groups
    bn = tile.bn
    while bn > 1 and (geometry.out_channels % bn or (per_group % bn and bn % per_group)):
        bn //= 2
    return replace(tile, bn=max(bn, 1))


def _bsr_kernel(builder, x, gemm: Gemm, choice: KernelChoice, epilogue: Epilogue, settings) -> KernelCall:
    from tvm import relax

    matrix = to_bsr(gemm.w_out_in, choice.block)
    mr = bsr_rows(gemm.rows, choice.block.rows, settings.lanes)
    g = gemm.geometry
    if g is None:
        offsets = matrix.offsets(lambda column: column)
        x_size = gemm.rows * gemm.reduce

        def row_base(j):
            return j * gemm.reduce

    else:
        taps = g.kernel_h * g.kernel_w

        def column_offset(column):  # ONNX order (c, kh, kw) -> offset from the pixel's corner in padded NHWC
            c, tap = np.divmod(column, taps)
            kh, kw = np.divmod(tap, g.kernel_w)
            return (kh * g.dilation[0] * g.padded_w + kw * g.dilation[1]) * g.channels + c

        offsets = matrix.offsets(column_offset)
        x_size = g.batch * g.padded_h * g.padded_w * g.channels

        def row_base(j):
            n, top, left = g.pixel(j)
            return ((n * g.padded_h + top) * g.padded_w + left) * g.channels

    shape = BsrKernelShape(
        rows=gemm.rows, x_size=x_size, out_features=gemm.cols, block=choice.block, nnzb=matrix.nnzb, mr=mr,
        rows_outer=gemm.rows // mr >= 16,
    )  # fmt: skip
    x = builder.emit(relax.op.reshape(x, [x_size]))
    inputs = [x, relax.const(matrix.data), relax.const(offsets), relax.const(matrix.indptr)]
    return KernelCall(bsr_gemm(shape, epilogue, row_base), inputs, f"{mr}x{choice.block.rows}")


def _activation_matmul_shapes(call) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Shapes of A and B when `call` is a float32 matmul of two activations with the same static batch axes."""
    from tvm import ir, relax

    if not (isinstance(call.op, ir.Op) and call.op.name == "relax.matmul"):
        return None
    a, b = call.args
    if not all(isinstance(arg, relax.Var) and getattr(arg.ty, "dtype", None) == "float32" for arg in (a, b)):
        return None
    shapes = [static_shape(arg) for arg in (a, b)]
    if None in shapes or len(shapes[0]) < 2 or len(shapes[0]) != len(shapes[1]) or shapes[0][:-2] != shapes[1][:-2]:
        return None
    return shapes[0], shapes[1]


def _emit_batch_matmul(rewriter, call, shapes, settings: RewriteSettings):
    from tvm import relax

    builder = rewriter.builder_
    (*lead, rows, reduce), (*_, cols) = shapes
    batch = int(np.prod(lead, dtype=np.int64))
    tile = batch_tile(gemm_tile(rows, reduce, cols, settings.lanes), cols)
    gvar = _add_kernel(builder, batch_matmul(batch, rows, reduce, cols, tile), "sculpt_bmm")
    a = builder.emit(relax.op.reshape(call.args[0], [batch, rows, reduce]))
    b = builder.emit(relax.op.reshape(call.args[1], [batch, reduce, cols]))
    out = builder.emit(relax.call_tir(gvar, [a, b], relax.TensorType((batch, rows, cols), "float32")))
    rewriter.reports.append(
        LayerReport(
            name=f"matmul_{len(rewriter.reports)}",
            op="batch_matmul",
            gemm=f"{batch}x({rows}x{reduce}x{cols})",
            kernel="dense",
            block=None,
            block_sparsity=None,
            tile=tile.describe(),
            fused="none",
            reason="both operands are activations",
        )  # fmt: skip
    )
    return relax.op.reshape(out, [*lead, rows, cols])
