"""Measured activation statistics: run a model on real inputs and look at every intermediate tensor.

ReLU outputs already hold many exact zeros ("natural sparsity"); a zero-skipping engine or a ReRAM crossbar
(zero input codes leave wordlines idle) saves work on each of them. `activation_stats` measures that per tensor:

    >>> rows = activation_stats(model, {"input": images})
    >>> rows[2]
    {'tensor': 'relu1', 'node': '/relu/Relu', 'op': 'Relu', 'shape': [300, 16, 8, 8],
     'sparsity': 0.53, 'mean': 0.41, 'max': 6.2}

`ProbeSession` is the machinery underneath: an onnxruntime session on a copy of the model whose graph outputs
also expose the tensors asked for. The activation-prune pass reuses it to calibrate its masks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

import numpy as np
import onnx

from optimizer import keys
from optimizer.data import feed_in_chunks, fixed_batch, graph_inputs
from optimizer.errors import UsageError
from optimizer.model import FLOAT_TYPES, metadata_value
from optimizer.ort_session import ort_session, run_outputs

ACTIVATION_MASKS_KEY = keys.ACTIVATION_MASKS  # written by the activation-prune pass: [{"tensor": ...}, ...]


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type is known after (lenient) shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference failures leave us with the declared types only
        inferred = model
    graph = inferred.graph
    types = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    return types


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with inferred value_info, for element types the file does not record (the model when that fails)."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # onnx raises several unrelated types here
        return model


class ProbeSession:
    """An onnxruntime session that also returns the intermediate tensors `probes`.

    Preconditions: every probe is produced by a node of the top-level graph and has an inferable element type
    (`tensor_types`). `run` returns the model's own outputs and the probes, by name.
    """

    def __init__(self, model: onnx.ModelProto, probes: Iterable[str], *, threads: int | None = 1):
        probes = list(dict.fromkeys(probes))
        types = tensor_types(model)
        if any(name not in types for name in probes):
            types = {**tensor_types(_inferred(model)), **types}
        probed = onnx.ModelProto()
        probed.CopyFrom(model)
        present = {o.name for o in probed.graph.output}
        for name in probes:
            if name in present:
                continue
            if name not in types:
                raise UsageError(f"cannot observe tensor {name!r}: its element type is not known after shape inference")
            probed.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
            present.add(name)
        self._session = ort_session(probed, threads)
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]
        self.batch = fixed_batch(graph_inputs(model))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs and probes by name; more samples than a fixed batch are fed in chunks (data.feed_in_chunks)."""
        return feed_in_chunks(self._run_once, feeds, self.batch)

    def _run_once(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [name for name in self.input_names if name not in feeds]
        if missing:
            raise UsageError(f"no data for model input {missing[0]!r}; inputs given: {', '.join(feeds) or '(none)'}")
        return run_outputs(self._session, {name: feeds[name] for name in self.input_names}, self.output_names)


def wta_k(keep: float, units: int) -> int:
    """Winners per sample for a kept fraction: ceil(keep * units), at least 1 (the pass and the torch module share
    it). wta_k(0.25, 10) == 3."""
    units = int(units)  # a traced shape entry may arrive as a tensor
    return min(units, max(1, math.ceil(round(keep * units, 9))))


def activation_stats(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, tensors: Iterable[str] | None = None
) -> list[dict]:
    """One row per floating-point tensor produced by a node (or per name in `tensors`), in graph order.

    By default the internals of activation-prune masks (scores, TopK, the 0/1 mask) are left out; the masked
    tensor and its pre-mask value `<tensor>/actmask/input` stay. Row keys: tensor, node (producer name), op
    (producer op type), shape (as observed, batch included), sparsity (fraction of exact zeros), mean, max. A
    tensor whose element type cannot be inferred gets a row with those figures set to None and a `note` saying
    why. Extra keys in `feeds` (e.g. "labels") are ignored.
    """
    types = tensor_types(model)
    producers = {out: node for node in model.graph.node for out in node.output if out and node.op_type != "Constant"}
    if tensors is None:
        masked = {m["tensor"] for m in json.loads(metadata_value(model, ACTIVATION_MASKS_KEY) or "[]")}
        wanted = [t for t in producers if not _mask_internal(t, producers[t], masked)]
    else:
        wanted = list(tensors)
    unknown = [name for name in wanted if name not in producers]
    if unknown:
        raise UsageError(f"tensor {unknown[0]!r} is not produced by any node of the model")
    observable = [name for name in wanted if types.get(name) in FLOAT_TYPES]
    values = ProbeSession(model, observable).run(feeds) if observable else {}
    rows = []
    for name in wanted:
        node = producers[name]
        row = {"tensor": name, "node": node.name, "op": node.op_type}
        if name in values:
            row.update(describe_values(values[name]))
        elif name in types:
            continue  # integer and boolean tensors (shapes, indices, masks) are not activations
        else:
            row.update(shape=None, sparsity=None, mean=None, max=None, note="element type not inferable")
        rows.append(row)
    return rows


def _mask_internal(tensor: str, producer: onnx.NodeProto, masked: set[str]) -> bool:
    """Whether `tensor` is an intermediate of a mask the activation-prune pass inserted on one of the `masked`
    tensors (their names, from ACTIVATION_MASKS_KEY): produced by a `<masked>/actmask/` node, not the result."""
    return any(producer.name.startswith(f"{name}/actmask/") and tensor != name for name in masked)


def describe_values(values: np.ndarray) -> dict:
    """shape, sparsity (fraction of exact zeros), mean and max of one observed tensor."""
    flat = values.astype(np.float64, copy=False).ravel()
    if flat.size == 0:
        return {"shape": list(values.shape), "sparsity": 0.0, "mean": 0.0, "max": 0.0}
    return {
        "shape": list(values.shape),
        "sparsity": float(np.count_nonzero(flat == 0) / flat.size),
        "mean": float(flat.mean()),
        "max": float(flat.max()),
    }



def zero_skip_macs(
    node: onnx.NodeProto, index: int, values: np.ndarray, constants: dict[str, np.ndarray]
) -> dict[str, float | str]:
    """MACs per sample of a Conv/Gemm/MatMul, and how many of them read a zero of input `index` (`values`, batch
    first): what an engine that skips zero activations would skip. Exact, padding and strides included.

    Returns {"macs", "skipped_macs"} or {"note": why it cannot count}. Only the data operand is counted; the
    weight operand must be a constant (`constants`: initializer name -> array).
    """
    weight = constants.get(node.input[1]) if len(node.input) > 1 else None
    if index != 0:
        return {"note": f"the activation is operand {index} of {node.op_type} {node.name!r}, not its data input"}
    if weight is None:
        return {"note": f"{node.op_type} {node.name!r} has no constant weight"}
    samples = max(values.shape[0], 1)
    if node.op_type == "Conv":
        return _conv_zero_skip_macs(node, values, weight, samples)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm":
        outputs = weight.shape[0] if attrs.get("transB", 0) else weight.shape[1]
    elif weight.ndim == 2:
        outputs = weight.shape[1]
    else:
        return {"note": f"MatMul {node.name!r} has a {weight.ndim}-D weight; only 2-D weights are counted"}
    zeros = np.count_nonzero(values == 0)
    return {"macs": float(values.size * outputs / samples), "skipped_macs": float(zeros * outputs / samples)}


def _conv_zero_skip_macs(node: onnx.NodeProto, values: np.ndarray, weight: np.ndarray, samples: int) -> dict:
    """Convolving the zero indicator with an all-ones kernel counts, per output, the zero inputs it reads."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["zeros", "ones"], ["count"], name="count")],
        "zero_skip_macs",
        [onnx.helper.make_tensor_value_info("zeros", onnx.TensorProto.FLOAT, values.shape)],
        [onnx.helper.make_tensor_value_info("count", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.ones(weight.shape, np.float32), "ones")],
    )
    graph.node[0].attribute.extend(node.attribute)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    session = ProbeSession(model, [])
    count = session.run({"zeros": (values == 0).astype(np.float32)})["count"]
    reads_per_output = int(np.prod(weight.shape[1:]))
    return {
        "macs": count.size * reads_per_output / samples,
        "skipped_macs": float(count.sum(dtype=np.float64)) / samples,
    }
