"""A light view over an ONNX graph: producers, consumers, constants and static shapes.

Built on onnx-graphsurgeon: a tensor's producer is `tensor.inputs`, its consumers `tensor.outputs`, and the
library keeps both directions in step while a pass rewires. `GraphView` adds what the channel analysis asks
for again and again (the constant behind an input, a tensor's static dims, the graph's opset) and the few
edits a pruning pass makes: replace a constant input, append one, put a bias `Add` after a node. Shapes come
from `onnx.shape_inference` once, at construction; `to_model()` drops every intermediate shape before export
so nothing stale reaches value_info, then infers them again.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optimizer.model import FLOAT_TYPES, copy_model_fields, default_opset

Dim = int | str | None


class GraphView:
    """An editable onnx-graphsurgeon graph plus lookups. Construct from a ModelProto; the proto is not modified."""

    def __init__(self, model: onnx.ModelProto):
        self.source = model
        self.graph = gs.import_onnx(model)
        _apply_shapes(self.graph, inferred_value_info(model))
        self.graph.toposort()
        _fill_missing_shapes(self.graph)
        self.tensors: dict[str, gs.Tensor] = self.graph.tensors()
        self.opset = default_opset(model)
        self._graph_inputs = {t.name for t in self.graph.inputs}
        self._graph_outputs = {t.name for t in self.graph.outputs}
        self.outer_scope_names = _names_used_in_subgraphs(self.graph)
        self._constants: dict[str, np.ndarray] = {}
        self._counter = itertools.count()

    @property
    def nodes(self) -> list[gs.Node]:
        return list(self.graph.nodes)

    def constant(self, tensor: gs.Tensor | None) -> np.ndarray | None:
        """The value of a constant tensor (an initializer or a Constant node's output); None for activations.

        An initializer that is also a graph input can be overridden at run time, so it is not a constant.
        """
        if tensor is None or tensor.name in self._graph_inputs:
            return None
        if tensor.name in self._constants:
            return self._constants[tensor.name]
        value = None
        if isinstance(tensor, gs.Constant):
            value = np.asarray(tensor.values)
        elif len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
            attrs = tensor.inputs[0].attrs
            if isinstance(attrs.get("value"), gs.Constant):
                value = np.asarray(attrs["value"].values)
        if value is not None:
            self._constants[tensor.name] = value
        return value

    def input_constant(self, node: gs.Node, index: int) -> np.ndarray | None:
        """The constant at `node.inputs[index]`, or None when that input is absent, empty or not constant."""
        if index >= len(node.inputs) or not node.inputs[index].name:
            return None
        return self.constant(node.inputs[index])

    def has_input(self, node: gs.Node, index: int) -> bool:
        return index < len(node.inputs) and bool(node.inputs[index].name)

    def shape(self, tensor: gs.Tensor) -> tuple[Dim, ...] | None:
        """Static dims (int), symbolic dims (str) or unknown dims (None); None when even the rank is unknown."""
        value = self.constant(tensor)
        if value is not None:
            return tuple(value.shape)
        if tensor.shape is None:
            return None
        return tuple(d if isinstance(d, (int, str)) and d != "" else None for d in tensor.shape)

    def rank(self, tensor: gs.Tensor) -> int | None:
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def dtype(self, tensor: gs.Tensor) -> np.dtype:
        value = self.constant(tensor)
        if value is not None:
            return value.dtype
        return np.dtype(tensor.dtype) if tensor.dtype is not None else np.dtype(np.float32)

    def producer(self, tensor: gs.Tensor) -> gs.Node | None:
        return tensor.inputs[0] if tensor.inputs else None

    def consumers(self, tensor: gs.Tensor) -> list[gs.Node]:
        return list(tensor.outputs)

    def is_graph_output(self, tensor: gs.Tensor) -> bool:
        return tensor.name in self._graph_outputs

    def is_graph_input(self, tensor: gs.Tensor) -> bool:
        return tensor.name in self._graph_inputs

    def replace_constant(self, node: gs.Node, index: int, values: np.ndarray) -> None:
        """Give `node.inputs[index]` a new constant. Other users of the old tensor keep the old values."""
        old = node.inputs[index]
        tensor = gs.Constant(self._fresh_name(old.name), np.ascontiguousarray(values))
        node.inputs[index] = tensor
        self._register(tensor, values)

    def append_constant(self, node: gs.Node, values: np.ndarray, hint: str) -> None:
        """Add a constant as the node's next input (e.g. a bias the node did not have)."""
        tensor = gs.Constant(self._fresh_name(f"{node.name or node.op}_{hint}"), np.ascontiguousarray(values))
        node.inputs.append(tensor)
        self._register(tensor, values)

    def add_bias_after(self, node: gs.Node, bias: np.ndarray) -> gs.Node:
        """Insert `Add(node output, bias)` between the node and all its consumers; returns the new node."""
        output = node.outputs[0]
        added = gs.Variable(self._fresh_name(f"{output.name}_unbiased"), dtype=output.dtype)
        node.outputs[0] = added
        constant = gs.Constant(self._fresh_name(f"{node.name or node.op}_bias"), np.ascontiguousarray(bias))
        self._register(constant, bias)
        self._register(added, None)
        add = gs.Node(
            "Add", name=self._fresh_name(f"{node.name or node.op}_bias_add"), inputs=[added, constant], outputs=[output]
        )
        self.graph.nodes.append(add)
        return add

    def duplicate(self, node: gs.Node) -> gs.Node:
        """A copy of `node` reading the same inputs and writing fresh outputs (to edit for one consumer only)."""
        outputs = [gs.Variable(self._fresh_name(t.name), dtype=t.dtype) for t in node.outputs]
        copy = gs.Node(node.op, name=self._fresh_name(node.name or node.op), attrs=dict(node.attrs),
                       inputs=list(node.inputs), outputs=outputs, domain=node.domain)
        for tensor in outputs:
            self._register(tensor, None)
        self.graph.nodes.append(copy)
        return copy

    def to_model(self) -> onnx.ModelProto:
        """Export the edited graph: intermediate shapes are cleared, dead nodes swept, shapes inferred again."""
        keep = self._graph_inputs | self._graph_outputs
        for tensor in self.graph.tensors().values():
            if isinstance(tensor, gs.Variable) and tensor.name not in keep:
                tensor.shape = None
        self.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        model = gs.export_onnx(self.graph, do_type_check=False)
        copy_model_fields(self.source, model)
        del model.graph.value_info[:]  # graphsurgeon writes type-only entries; inference gives full ones
        # every GraphView infers its own shapes again, so the slower symbolic inference is not spent here
        model.graph.value_info.extend(inferred_value_info(model, symbolic=False))
        return model

    def _fresh_name(self, hint: str) -> str:
        while True:
            name = f"{hint}__{next(self._counter)}"
            if name not in self.tensors:
                return name

    def _register(self, tensor: gs.Tensor, values: np.ndarray | None) -> None:
        self.tensors[tensor.name] = tensor
        if values is not None:
            self._constants[tensor.name] = np.asarray(values)


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with the data of large float initializers left out: shape inference needs only their dims,
    and serializing hundreds of megabytes of weights would dominate its cost."""
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    for tensor in model.graph.initializer:
        if tensor.data_type in FLOAT_TYPES and np.prod(tensor.dims) > 64:
            graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        else:
            graph.initializer.append(tensor)
    return light


def inferred_value_info(model: onnx.ModelProto, symbolic: bool = True) -> list[onnx.ValueInfoProto]:
    """Shapes of the intermediate tensors; [] when inference fails (the analysis copes with missing shapes).

    onnx's inference loses the rank after a Reshape whose target is computed from Shape ops (a transformer
    block inside a CNN, as in PP-OCRv4 rec's neck), which leaves every group after it unprunable; the tensors it
    leaves without a shape take the one onnxruntime's symbolic shape inference finds, when it finds one
    (`symbolic=False`: onnx's alone, for an exported model whose value_info is a courtesy)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_without_weights(model), strict_mode=False, data_prop=True)
    except Exception:  # onnx raises several unrelated types here
        return []
    found = {info.name: info for info in inferred.graph.value_info if _has_shape(info)}
    known = found.keys() | {v.name for v in inferred.graph.output if _has_shape(v)}
    missing = {out for node in model.graph.node for out in node.output if out and out not in known}
    if missing and symbolic:
        found.update(_symbolic_shapes(model, missing))
    return list(found.values()) + [info for info in inferred.graph.value_info if info.name not in found]


def _has_shape(info: onnx.ValueInfoProto) -> bool:
    return info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape")


def _symbolic_shapes(model: onnx.ModelProto, names: set[str]) -> dict[str, onnx.ValueInfoProto]:
    """name -> value info with a shape, for those of `names` that onnxruntime's symbolic shape inference
    resolves ({} when it fails: it reads constant values, so it gets the model with its weights)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    logger = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # its warnings are about dims it cannot merge, not the user's to act on
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    except Exception:  # it raises whatever the op it cannot handle raises
        return {}
    finally:
        logger.setLevel(level)
    if inferred is None:
        return {}
    return {info.name: info for info in [*inferred.graph.value_info, *inferred.graph.output]
            if info.name in names and _has_shape(info)}


def with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model whose value_info holds the inferred shapes."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.value_info[:]
    result.graph.value_info.extend(inferred_value_info(model))
    return result


def _apply_shapes(graph: gs.Graph, value_info: list[onnx.ValueInfoProto]) -> None:
    tensors = graph.tensors()
    for info in value_info:
        tensor = tensors.get(info.name)
        if not isinstance(tensor, gs.Variable) or not info.type.HasField("tensor_type"):
            continue
        kind = info.type.tensor_type
        if kind.HasField("shape"):
            tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in kind.shape.dim]
        if kind.elem_type and tensor.dtype is None:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type)


_SHAPE_PRESERVING = {
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Elu", "Selu", "Celu", "Softplus",
    "Softsign", "Mish", "Erf", "Clip", "Identity", "Dropout", "Cast", "Abs", "Neg", "Exp", "Log", "Sqrt",
    "BatchNormalization", "InstanceNormalization", "GroupNormalization", "LayerNormalization", "Softmax",
}
_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min", "Where"}


def _fill_missing_shapes(graph: gs.Graph) -> None:
    """Shapes onnx's inference leaves out (it stops at ops whose function body it cannot infer, such as
    GroupNormalization-18) for ops that keep or broadcast their input's shape, so the analysis can go on."""
    for node in graph.nodes:
        out = node.outputs[0] if node.outputs else None
        if out is None or out.shape is not None:
            continue
        shapes = [t.shape for t in node.inputs if t.name and t.shape is not None]
        if node.op in _SHAPE_PRESERVING and node.inputs[0].shape is not None:
            out.shape = list(node.inputs[0].shape)
        elif node.op in _BROADCASTING and len(shapes) == len([t for t in node.inputs if t.name]):
            out.shape = _broadcast(shapes)


def _broadcast(shapes: list) -> list | None:
    rank = max(len(s) for s in shapes)
    dims = []
    for axis in range(rank):
        column = {s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0} - {1}
        if len(column) > 1:
            return None
        dims.append(column.pop() if column else 1)
    return dims


def _names_used_in_subgraphs(graph: gs.Graph) -> set[str]:
    """Outer-scope tensors that If/Loop/Scan bodies read: they are invisible as node inputs, so never prune them."""
    names: set[str] = set()
    for node in graph.nodes:
        for value in node.attrs.values():
            bodies = value if isinstance(value, list) else [value]
            for body in bodies:
                if isinstance(body, gs.Graph):
                    for inner in body.nodes:
                        names.update(t.name for t in inner.inputs)
                    names.update(_names_used_in_subgraphs(body))
    return names


