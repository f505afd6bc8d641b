"""Finding the ONNX nodes that run on crossbars and reading their integer weights, scales and zero points.

A crossbar layer is a Conv, Gemm or MatMul whose weight is constant, or the integer forms ConvInteger,
MatMulInteger, QLinearConv and QLinearMatMul. For QDQ models the weight is DequantizeLinear(int8 constant) and
the activation DequantizeLinear(x_q): the crossbar takes x_q and the integers as they are. A float weight is
quantized per output channel, symmetric (s_w[j] = max|W[:, j]| / 127); a float activation is quantized to uint8
with an asymmetric per-tensor range from calibration data. Nodes that cannot be mapped are declined with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from optimizer.declines import Decline
from optimizer.ort_session import ort_session
from optimizer.quant import qmax
from runtimes.reram.mapping import ConvGeometry

_RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
               "Bernoulli"}
MAPPED_OPS = ("Conv", "Gemm", "MatMul", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul")


@dataclass
class InputCoding:
    """How activations become unsigned input codes u.

    from_float: x is quantized here, u = clip(round(x / scale) + zero_point, 0, 2^bits − 1) (scale set by
      calibration). Otherwise x already holds integer codes; signed codes get +2^(bits−1) so u ≥ 0.
    """

    from_float: bool
    scale: float | None = None
    zero_point: int = 0


@dataclass
class OutputStage:
    """What the layer returns. float: s_x·s_w·alpha·(acc − z·Σw) + bias; int32: acc − z·Σw (ConvInteger /
    MatMulInteger); requantize: round(float / y_scale) + y_zero_point, saturated (QLinearConv / QLinearMatMul)."""

    kind: str = "float"
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    y_scale: float = 1.0
    y_zero_point: int = 0


@dataclass
class LayerSpec:
    name: str
    op_type: str
    input_name: str
    activation_name: str
    output_name: str
    weights: list[np.ndarray]
    weight_scale: np.ndarray
    weight_source: str
    input: InputCoding
    output: OutputStage
    bias: np.ndarray | None = None
    alpha: float = 1.0
    trans_a: bool = False
    conv: ConvGeometry | None = None
    weight_key: str = ""

    @property
    def plan_keys(self) -> tuple[str, ...]:
        """Names a bit-slice plan may use for this layer: node name, output name, integer weight name."""
        return tuple(k for k in (self.name, self.output_name, self.weight_key) if k)

    @property
    def k(self) -> int:
        return self.weights[0].shape[0]

    @property
    def m(self) -> int:
        return sum(w.shape[1] for w in self.weights)


class Constants:
    """Values of tensors computable from initializers and Constant nodes alone (evaluated once, on demand)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        inputs = {i.name for i in model.graph.input}
        self.values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name not in inputs}
        self.producers = {out: node for node in model.graph.node for out in node.output}
        self.constant = set(self.values)
        for node in model.graph.node:
            foldable = node.op_type not in _RANDOM_OPS and not any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
            if foldable and all(i in self.constant for i in node.input if i):
                self.constant.update(o for o in node.output if o)

    def get(self, name: str) -> np.ndarray | None:
        if name not in self.constant:
            return None
        if name not in self.values:
            node = self.producers[name]
            self.values.update(self._evaluate(node, [self.get(i) if i else None for i in node.input]))
        return self.values.get(name)

    def _evaluate(self, node: onnx.NodeProto, inputs: list) -> dict[str, np.ndarray]:

        outputs = [o for o in node.output if o]
        graph = onnx.helper.make_graph(
            [node], "constant", [], [onnx.helper.make_empty_tensor_value_info(o) for o in outputs],
            initializer=[numpy_helper.from_array(np.asarray(v), n)
                         for n, v in zip(node.input, inputs, strict=True) if n],
        )
        model = onnx.helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version,
                                       functions=self.model.functions)
        try:
            session = ort_session(model, what=f"the constant inputs of {node.op_type} {node.name!r}")
            return dict(zip(outputs, session.run(outputs, {}), strict=True))
        except Exception as e:  # onnxruntime raises its own exception types
            raise _Declined(f"constant input of {node.op_type} {node.name!r} cannot be evaluated: {e}") from e

    def producer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producers.get(name)
        return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def find_layers(model: onnx.ModelProto, *, weight_bits: int) -> tuple[list[LayerSpec], list[Decline]]:
    constants = Constants(model)
    layers, declines = [], []
    for index, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{index}"
        if node.op_type == "ConvTranspose":
            declines.append(Decline(name, node.op_type, "not-mapped",
                                    "transposed convolutions are not mapped (runs digitally)"))
        if node.op_type not in MAPPED_OPS or node.domain not in ("", "ai.onnx"):
            continue
        try:
            layer = _build(node, name, constants, weight_bits)
        except _Declined as reason:
            declines.append(Decline(name, node.op_type, "not-mapped", str(reason)))
            continue
        layers.append(layer)
    return layers, declines


class _Declined(Exception):
    """Raised deep in a layer's construction; find_layers turns it into the layer's Decline."""


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@dataclass
class _Parts:
    """What one node contributes before its weight is laid out: integer weight, scales, codings, names."""

    weight: np.ndarray
    scale: np.ndarray
    source: str
    weight_key: str
    coding: InputCoding
    input_name: str
    output: OutputStage
    bias_name: str


def _build(node: onnx.NodeProto, name: str, constants: Constants, weight_bits: int) -> LayerSpec:
    attrs = _attrs(node)
    op = node.op_type
    parts = _qdq_parts(node, attrs, constants, weight_bits) if op in ("Conv", "Gemm", "MatMul") \
        else _integer_parts(node, attrs, constants)
    bias = None
    if parts.bias_name:
        bias = constants.get(parts.bias_name)
        if bias is None:
            raise _Declined(f"bias {parts.bias_name!r} is not a constant")
        bias = bias.astype(np.float64)
    layer = LayerSpec(
        name=name, op_type=op, input_name=parts.input_name, activation_name=node.input[0],
        output_name=node.output[0], weights=[], weight_scale=np.asarray(parts.scale, dtype=np.float64),
        weight_source=parts.source, input=parts.coding, output=parts.output, bias=bias, weight_key=parts.weight_key,
    )
    _shape_weights(layer, parts.weight, attrs)
    if op == "QLinearConv" and bias is not None:
        layer.bias = bias * parts.coding.scale * layer.weight_scale
    if op == "Gemm":
        layer.alpha, layer.trans_a = float(attrs.get("alpha", 1.0)), bool(attrs.get("transA", 0))
        if bias is not None:
            layer.bias = float(attrs.get("beta", 1.0)) * bias
    return layer


def _qdq_parts(node: onnx.NodeProto, attrs: dict, constants: Constants, weight_bits: int) -> _Parts:
    """Conv / Gemm / MatMul: QDQ integers where the graph has them, else quantized here."""
    weight_name = node.input[1]
    weight, scale, source = _qdq_or_float_weight(constants, weight_name, _output_axis(node.op_type, attrs),
                                                 weight_bits)
    dq = constants.producer(weight_name, "DequantizeLinear")
    weight_key = dq.input[0] if dq is not None and source == "qdq" else weight_name
    coding, input_name = _activation_coding(constants, node.input[0])
    bias_name = node.input[2] if len(node.input) > 2 else ""
    return _Parts(weight, scale, source, weight_key, coding, input_name, OutputStage(), bias_name)


def _integer_parts(node: onnx.NodeProto, attrs: dict, constants: Constants) -> _Parts:
    """ConvInteger / MatMulInteger (int32 out) and QLinearConv / QLinearMatMul (requantized out)."""
    op = node.op_type
    integer = op in ("ConvInteger", "MatMulInteger")
    x_zp_index, w_index, w_zp_index = (2, 1, 3) if integer else (2, 3, 5)
    q = constants.get(node.input[w_index])
    if q is None:
        raise _Declined("the weight is not a constant; only stationary weights are mapped")
    axis = _output_axis(op, attrs)
    weight = q.astype(np.int64) - _along(np.asarray(_optional(constants, node, w_zp_index, 0), np.int64), axis, q.ndim)
    x_zp = _optional(constants, node, x_zp_index, 0)
    if np.size(x_zp) != 1:
        raise _Declined("per-channel activation zero points cannot be applied per crossbar row")
    channels = q.shape[axis]
    if integer:
        scale, x_scale, output = np.ones(channels), 1.0, OutputStage("int32", np.dtype(np.int32))
    else:
        w_scale, x_scale = constants.get(node.input[4]), constants.get(node.input[1])
        y_scale, y_zp = constants.get(node.input[6]), _optional(constants, node, 7, 0)
        if w_scale is None or x_scale is None or y_scale is None:
            raise _Declined("scales must be constants")
        scale = np.broadcast_to(np.asarray(w_scale, np.float64).reshape(-1), (channels,))
        y_dtype = np.asarray(y_zp).dtype if isinstance(y_zp, np.ndarray) else np.dtype(np.uint8)
        output = OutputStage("requantize", y_dtype, float(np.asarray(y_scale).item()), int(np.asarray(y_zp).item()))
    coding = InputCoding(False, float(np.asarray(x_scale).item()), int(np.asarray(x_zp).item()))
    bias_name = node.input[8] if op == "QLinearConv" and len(node.input) > 8 else ""
    return _Parts(weight, scale, "integer", node.input[w_index], coding, node.input[0], output, bias_name)


def _output_axis(op: str, attrs: dict) -> int:
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        return 0
    if op == "Gemm":
        return 0 if attrs.get("transB", 0) else 1
    return 1


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """Broadcast per-channel values along `axis` of an ndim tensor (scalars stay scalars)."""
    if values.size <= 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = values.size
    return values.reshape(shape)


def _optional(constants: Constants, node: onnx.NodeProto, index: int, default: int) -> np.ndarray | int:
    if len(node.input) <= index or not node.input[index]:
        return default
    value = constants.get(node.input[index])
    if value is None:
        raise _Declined(f"input {node.input[index]!r} must be a constant")
    return value


def _qdq_or_float_weight(
    constants: Constants, name: str, axis: int, weight_bits: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """Integer weight, per-output-channel scale and where they came from ("qdq" or "float")."""
    dq = constants.producer(name, "DequantizeLinear")
    if dq is not None:
        q, scale = constants.get(dq.input[0]), constants.get(dq.input[1])
        zp = constants.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros((), np.int64)
        attrs = _attrs(dq)
        dq_axis = attrs.get("axis", 1) % max(q.ndim, 1) if q is not None else 0
        per_output = scale is not None and (scale.size == 1 or (dq_axis == axis and scale.ndim == 1))
        if q is not None and zp is not None and np.issubdtype(q.dtype, np.integer) and per_output \
                and not attrs.get("block_size", 0):
            weight = q.astype(np.int64) - _along(zp.astype(np.int64), axis, q.ndim)
            channels = q.shape[axis]
            return weight, np.broadcast_to(scale.astype(np.float64).reshape(-1), (channels,)).copy(), "qdq"
    value = constants.get(name)
    if value is None:
        raise _Declined("the weight is not a constant; only stationary weights are mapped (runs digitally)")
    if not np.issubdtype(value.dtype, np.floating):
        raise _Declined(f"the weight has type {value.dtype}; expected float or DequantizeLinear of integers")
    return _quantize_per_channel(value.astype(np.float64), axis, weight_bits)


def _quantize_per_channel(weight: np.ndarray, axis: int, bits: int) -> tuple[np.ndarray, np.ndarray, str]:
    moved = np.moveaxis(weight, axis, 0)
    largest = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1)
    scale = np.where(largest > 0, largest / qmax(bits), 1.0)
    q = np.clip(np.rint(weight / _along(scale, axis, weight.ndim)), -qmax(bits), qmax(bits)).astype(np.int64)
    return q, scale, "float"


def _activation_coding(constants: Constants, name: str) -> tuple[InputCoding, str]:
    dq = constants.producer(name, "DequantizeLinear")
    if dq is not None:
        scale = constants.get(dq.input[1])
        zp = constants.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros((), np.int64)
        if scale is not None and zp is not None and scale.size == 1 and zp.size == 1:
            return InputCoding(False, float(scale.reshape(())), int(zp.reshape(()))), dq.input[0]
    return InputCoding(True), name


def _shape_weights(layer: LayerSpec, weight: np.ndarray, attrs: dict) -> None:
    """Split the weight into per-group (K, M_g) matrices in crossbar row order and record conv geometry."""
    op = layer.op_type
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        groups = int(attrs.get("group", 1))
        kernel = tuple(int(k) for k in weight.shape[2:])
        nd = len(kernel)
        if weight.shape[0] % groups:
            raise _Declined(f"{weight.shape[0]} output channels do not divide into {groups} groups")
        layer.conv = ConvGeometry(
            kernel=kernel,
            strides=tuple(attrs.get("strides", [1] * nd)),
            dilations=tuple(attrs.get("dilations", [1] * nd)),
            pads=tuple(attrs["pads"]) if "pads" in attrs else None,
            auto_pad=attrs.get("auto_pad", b"NOTSET").decode() if isinstance(attrs.get("auto_pad"), bytes)
            else attrs.get("auto_pad", "NOTSET"),
            groups=groups,
        )
        per_group = weight.shape[0] // groups
        layer.weights = [weight[g * per_group : (g + 1) * per_group].reshape(per_group, -1).T.copy()
                         for g in range(groups)]
        return
    if weight.ndim != 2:
        raise _Declined(f"the weight has rank {weight.ndim}; crossbars take 2-D weights")
    if op == "Gemm" and attrs.get("transB", 0):
        weight = weight.T
    layer.weights = [np.ascontiguousarray(weight)]
