"""A tiny builder for hand-written ONNX test graphs (onnx.helper), shared by the channel-analysis tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    """Append nodes with fresh names; weights are seeded random initializers (or given arrays)."""

    def __init__(self, input_shape: tuple[int, ...], seed: int = 0, opset: int = 17):
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.input_shape = input_shape
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, value: np.ndarray, prefix: str = "c") -> str:
        name = self._name(prefix)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape).astype(np.float32) * 0.5

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, name: str | None = None,
           **attrs) -> str | list[str]:
        names = [self._name(f"{op_type.lower()}_out") for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name or self._name(op_type), **attrs))
        return names[0] if outputs == 1 else names

    def conv(self, x: str, cin: int, cout: int, k: int = 3, pads: int | None = None, group: int = 1,
             weight: np.ndarray | None = None, bias: np.ndarray | None = None, name: str | None = None,
             use_bias: bool = True, strides: int = 1) -> str:
        pads = k // 2 if pads is None else pads
        w = self.weight(cout, cin // group, k, k) if weight is None else weight
        inputs = [x, self.const(w, "w")]
        if use_bias:
            inputs.append(self.const(self.weight(cout) if bias is None else bias, "b"))
        return self.op("Conv", inputs, name=name, kernel_shape=[k, k], pads=[pads] * 4, group=group,
                       strides=[strides, strides])

    def model(self, outputs: list[str], shapes: list[tuple] | None = None) -> onnx.ModelProto:
        """The model; output shapes are inferred unless given (onnx cannot infer through every op)."""
        graph = helper.make_graph(
            self.nodes, "test", [helper.make_tensor_value_info("input", TensorProto.FLOAT, self.input_shape)],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, s)
             for o, s in zip(outputs, shapes or [None] * len(outputs), strict=True)],
            self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        if shapes is None:
            inferred = onnx.shape_inference.infer_shapes(model)
            for output, info in zip(model.graph.output, inferred.graph.output, strict=True):
                output.CopyFrom(info)
        onnx.checker.check_model(model, full_check=True)
        return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def relative_change(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """max |candidate - reference| over max |reference|, worst output."""
    return max(float(np.abs(c - r).max() / max(np.abs(r).max(), 1e-30))
               for r, c in zip(reference, candidate, strict=True))


def io_shapes(model: onnx.ModelProto) -> list:
    return [[(d.dim_value or d.dim_param) for d in v.type.tensor_type.shape.dim]
            for v in list(model.graph.input) + list(model.graph.output)]
