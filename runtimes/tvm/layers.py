"""Find the layers Sculpt's kernels take over in a Relax function, with the epilogue ops fused into each.

A layer is a `relax.matmul(x, W)`, an NHWC `relax.nn.conv2d(x, W)` or an NWC `relax.nn.conv1d(x, W)` (run as a
conv2d of height 1) with a constant float32 weight, followed by a chain of single-use ops that fold into its store:
`+ per-channel constant` (bias), `+ tensor of the same shape` (residual), then an optional `relu`. Toy example
(a ResNet block's second conv):

    lv9  = conv2d(lv8, W)         head
    lv11 = add(lv9, b)            bias       (lv9 used once)
    lv12 = add(lv4, lv11)         residual   (lv11 used once)
    lv13 = relu(lv12)             relu, tail -> lv13 = call_tir(conv_kernel, [pad(lv8), Wp, b, lv4])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_NO_KERNEL = {"relax.nn.conv3d", "relax.nn.conv1d_transpose", "relax.nn.conv2d_transpose"}
_HEADS = {"relax.matmul": "matmul", "relax.nn.conv2d": "conv2d", "relax.nn.conv1d": "conv1d"}


@dataclass
class ConvAttrs:
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    strides: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


@dataclass
class Layer:
    """A weight layer and the bindings fused into it. Vars are the original function's."""

    kind: str  # "matmul" | "conv2d" | "conv1d"
    head: object  # relax.Var bound to the matmul/conv
    x: object  # relax.Var: the activation input
    weight: np.ndarray  # matmul: [K, N]; conv2d: OHWI; conv1d: OHWI with H = 1
    in_shape: tuple[int, ...]  # as Relax has it: conv1d NWC, conv2d NHWC
    out_shape: tuple[int, ...]
    conv: ConvAttrs | None = None
    bias: np.ndarray | None = None  # [N]
    residual: object | None = None  # relax.Var with out_shape
    relu: bool = False
    tail: object = None  # relax.Var whose binding receives the fused kernel call
    absorbed: list = field(default_factory=list)  # vars whose bindings disappear (head and middle of the chain)


def find_layers(func) -> tuple[list[Layer], list[str]]:
    """Layers in binding order, and one line per matmul/conv left to TVM's default lowering (with the reason).

    A binding joins at most one chain: where two layers meet in one add (a residual block's main path and its
    downsample path), the first layer in binding order takes the add and the other one ends before it.
    """
    bindings = [b for block in func.body.blocks for b in block.bindings]
    users = _users(bindings, func.body.body)
    layers, declined, claimed = [], [], set()
    for binding in bindings:
        layer, reason = _match_head(binding)
        if layer is None:
            if reason:
                declined.append(reason)
            continue
        _extend_chain(layer, users, claimed)
        claimed.update([*layer.absorbed, layer.tail])
        layers.append(layer)
    return layers, declined


def _users(bindings, body) -> dict:
    """var -> list of bindings using it (the function's output counts as a user without a binding)."""
    from tvm import relax

    users: dict = {}

    def visit(expr, binding):
        if isinstance(expr, relax.Var):
            users.setdefault(expr, []).append(binding)
        elif isinstance(expr, relax.Call):
            for arg in expr.args:
                visit(arg, binding)
        elif isinstance(expr, relax.Tuple):
            for item in expr.fields:
                visit(item, binding)
        elif isinstance(expr, relax.TupleGetItem):
            visit(expr.tuple_value, binding)

    for binding in bindings:
        visit(binding.value, binding)
    visit(body, None)
    return users


def _op_name(expr) -> str | None:
    from tvm import ir, relax

    if isinstance(expr, relax.Call) and isinstance(expr.op, ir.Op):
        return expr.op.name
    return None


def static_shape(expr) -> tuple[int, ...] | None:
    from tvm import tirx

    shape = getattr(expr.ty, "shape", None)
    if shape is None or not all(isinstance(v, tirx.IntImm) for v in shape):
        return None
    return tuple(int(v) for v in shape)


def _constant(expr) -> np.ndarray | None:
    from tvm.ir.expr import Constant

    return expr.value.numpy() if isinstance(expr, Constant) else None


def _match_head(binding) -> tuple[Layer | None, str | None]:
    op = _op_name(binding.value)
    name = binding.var.name
    if op in _NO_KERNEL:
        return None, f"{op.removeprefix('relax.nn.')} {name}: no Sculpt kernel (TVM lowering + fallback schedule)"
    kind = _HEADS.get(op)
    if kind is None:
        return None, None
    call = binding.value
    x, w = call.args
    weight = _constant(w)
    if _constant(x) is not None:
        return None, f"{kind} {name}: constant on the left (TVM lowering + fallback schedule)"
    if weight is None:
        return None, None  # activation x activation: rewrite.py gives it the batched matmul kernel
    in_shape, out_shape = static_shape(x), static_shape(binding.var)
    if in_shape is None or out_shape is None:
        return None, f"{kind} {name}: shapes not static"
    if weight.dtype != np.float32 or x.ty.dtype != "float32" or binding.var.ty.dtype != "float32":
        return None, f"{kind} {name}: not float32"
    if kind == "matmul":
        if weight.ndim != 2 or len(in_shape) < 1:
            return None, f"matmul {name}: weight is not a matrix"
        return Layer(kind, binding.var, x, weight, in_shape, out_shape), None
    attrs = call.attrs
    layouts = (attrs.data_layout, attrs.kernel_layout, attrs.out_layout)
    if kind == "conv1d":
        if layouts != ("NWC", "OWI", "NWC"):
            return None, f"conv1d {name}: layout {attrs.data_layout}/{attrs.kernel_layout} is not NWC/OWI"
        left, right = (int(v) for v in attrs.padding)
        conv = ConvAttrs(
            padding=(0, left, 0, right),
            strides=(1, int(attrs.strides[0])),
            dilation=(1, int(attrs.dilation[0])),
            groups=int(attrs.groups),
        )
        return Layer(kind, binding.var, x, weight[:, None], in_shape, out_shape, conv=conv), None
    if layouts != ("NHWC", "OHWI", "NHWC"):
        return None, f"conv2d {name}: layout {attrs.data_layout}/{attrs.kernel_layout} is not NHWC/OHWI"
    conv = ConvAttrs(
        padding=tuple(int(v) for v in attrs.padding),
        strides=tuple(int(v) for v in attrs.strides),
        dilation=tuple(int(v) for v in attrs.dilation),
        groups=int(attrs.groups),
    )
    return Layer(kind, binding.var, x, weight, in_shape, out_shape, conv=conv), None


def _per_channel(value: np.ndarray | None, out_shape: tuple[int, ...]) -> np.ndarray | None:
    """The [N] vector if `value` broadcasts along the last axis only, else None."""
    if value is None or value.dtype != np.float32 or value.ndim > len(out_shape) or value.size != out_shape[-1]:
        return None
    if value.ndim and value.shape[-1] != out_shape[-1]:
        return None
    return value.reshape(-1)


def _extend_chain(layer: Layer, users: dict, claimed: set) -> None:
    current = layer.head
    chain = [layer.head]
    while not layer.relu:
        consumers = users.get(current, [])
        if len(consumers) != 1 or consumers[0] is None or consumers[0].var in claimed:
            break
        binding = consumers[0]
        if not _absorb(layer, binding.value, current):
            break
        current = binding.var
        chain.append(current)
    layer.tail = chain[-1]
    layer.absorbed = chain[:-1]


def _absorb(layer: Layer, call, current) -> bool:
    """Fold one op applied to the layer's output into the layer; False when it does not fold.

    Per-channel affine ops before the residual (a BatchNormalization that cleanup did not fold decomposes into
    them) go into the weights and bias; a residual is added once; ReLU ends the chain.
    """
    op = _op_name(call)
    if op == "relax.nn.relu":
        layer.relu = True
        return True
    if op not in ("relax.add", "relax.subtract", "relax.multiply", "relax.divide") or layer.residual is not None:
        return False
    a, b = call.args
    if not (a.same_as(current) or (op in ("relax.add", "relax.multiply") and b.same_as(current))):
        return False
    other = b if a.same_as(current) else a
    if other.same_as(current):
        return False
    vector = _per_channel(_constant(other), layer.out_shape)
    if vector is None:
        if op == "relax.add" and _constant(other) is None and static_shape(other) == layer.out_shape:
            layer.residual = other
            return True
        return False
    if op in ("relax.add", "relax.subtract"):
        shift = vector if op == "relax.add" else -vector
        layer.bias = shift if layer.bias is None else layer.bias + shift
        return True
    if op == "relax.divide" and not np.all(vector != 0):
        return False
    scale = vector if op == "relax.multiply" else (1 / vector).astype(np.float32)
    out_axis = -1 if layer.kind == "matmul" else 0  # matmul weight [K, N], conv weight OHWI
    layer.weight = layer.weight * np.expand_dims(scale, tuple(range(1, 4))) if out_axis == 0 else layer.weight * scale
    layer.bias = None if layer.bias is None else layer.bias * scale
    return True
