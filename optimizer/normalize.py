"""Load-time normalisation: the one place that turns the ONNX files exporters write into the form every pass,
the report and every runtime expect.

Exporters disagree on how they write the same network:

    IR 3 (ONNX Model Zoo, opset 7-9)   every initializer is also listed as a graph input (IR < 4 requires it)
    Paddle2ONNX, some TF converters     weights are `Constant` nodes, not initializers
    ONNX Model Zoo "light" graphs       weights are computed in the graph (`ConstantOfShape` of a constant shape)
    torch.onnx (TorchScript)            shape subgraphs (Shape -> Gather -> Concat -> Reshape) around static dims

`normalize(model)` makes them one form, without changing what the model computes:

- IR < 4: the IR is raised to the lowest version the opsets allow, and initializers are no longer graph inputs
  (at IR 3 listing them was mandatory, not an invitation to override them). At IR >= 4 an initializer that is
  also a graph input is an overridable default and stays exactly as it is (never folded, never frozen).
- top-level `Constant` nodes become initializers (so `weight = initializer` holds for every exporter);
- subgraphs that do not depend on a graph input are folded into initializers, and shape arithmetic on dims
  that are static is folded (onnx-graphsurgeon's folding, which evaluates with ONNX Runtime). Quantization
  nodes (QuantizeLinear/DequantizeLinear) are never folded: their integer weights are the point.

Third-party log output produced on the way (onnx-graphsurgeon's warnings, ONNX Runtime's log) is silenced;
what matters is returned as notes, one line each:

    >>> model, notes = normalize(onnx.load("light_bvlc_alexnet.onnx"))
    >>> notes
    ['IR 3 -> 7: initializers are weights, not graph inputs',
     'folded 16 constant nodes into initializers (+232.6 MiB of weights computed in the graph)']
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx
from onnx import helper, numpy_helper

MiB = 2**20
# never folded: QDQ weights stay integer; random ops are not constants
_NOT_FOLDED = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "RandomNormal", "RandomUniform",
               "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
_CONSTANT_VALUE_ATTRS = ("value", "value_float", "value_floats", "value_int", "value_ints")


def normalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The normalised copy of `model` and one note per change that a user may want to know about.

    Precondition: `model` passes the ONNX checker. The result computes the same outputs for every input and
    keeps the graph's inputs (bar IR-3 weight inputs) and outputs, names included.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    notes = []
    if result.ir_version < 4:
        notes.append(_raise_ir(result))
    made = constants_to_initializers(result)
    if made:
        notes.append(f"{made} Constant-node weights made initializers")
    if has_foldable_nodes(result.graph):
        before = _initializer_bytes(result.graph)
        folded, count = fold_constant_subgraphs(result)
        if count:
            result = folded
            grown = (_initializer_bytes(result.graph) - before) / MiB
            if grown >= 1:  # folding a few shape constants is not worth a line
                notes.append(f"folded {count} constant nodes into initializers (+{grown:.1f} MiB of weights "
                             "computed in the graph)")
    return result, notes


def _raise_ir(model: onnx.ModelProto) -> str:
    old = model.ir_version
    initializers = {t.name for t in model.graph.initializer}
    kept = [value for value in model.graph.input if value.name not in initializers]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    model.ir_version = max(4, helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))
    return f"IR {old} -> {model.ir_version}: initializers are weights, not graph inputs"


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turn the graph's top-level Constant nodes into initializers (in place); returns how many.

    A Constant whose output is a graph output stays a node (an output must be produced by a node); sparse and
    string constants stay nodes too. The edit goes through onnx-graphsurgeon (rewire, then cleanup), as every
    graph edit does.
    """
    import onnx_graphsurgeon as gs

    outputs = {o.name for o in model.graph.output}
    tensors = {}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            tensor = _constant_tensor(node)
            if tensor is not None:
                tensors[node.output[0]] = numpy_helper.to_array(tensor)
    if not tensors:
        return 0
    with quiet_third_party():
        graph = gs.import_onnx(model)
        for node in graph.nodes:
            if node.op != "Constant" or not node.outputs or node.outputs[0].name not in tensors:
                continue
            variable = node.outputs[0]
            constant = gs.Constant(variable.name, tensors[variable.name])
            for consumer in list(variable.outputs):
                for index, tensor in enumerate(consumer.inputs):
                    if tensor is variable:
                        consumer.inputs[index] = constant
            node.outputs.clear()
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        exported = gs.export_onnx(graph, do_type_check=False)
    model.graph.CopyFrom(exported.graph)
    return len(tensors)


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attribute in node.attribute:
        if attribute.name not in _CONSTANT_VALUE_ATTRS:
            continue
        value = helper.get_attribute_value(attribute)
        if attribute.name == "value":
            if value.data_type == onnx.TensorProto.STRING:
                return None
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            return tensor
        dtype = np.float32 if attribute.name.startswith("value_float") else np.int64
        return numpy_helper.from_array(np.array(value, dtype=dtype))
    return None


def has_foldable_nodes(graph: onnx.GraphProto) -> bool:
    """Whether some node has only constant inputs, or reads a Shape (cheap test before a folding round trip)."""
    overridable = {i.name for i in graph.input}
    constants = {t.name for t in graph.initializer} - overridable
    for node in graph.node:
        if node.op_type in _NOT_FOLDED:
            continue
        if node.op_type in ("Shape", "Size"):
            return True
        if node.input and all(not name or name in constants for name in node.input):
            return True
    return False


def fold_constant_subgraphs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Fold what does not depend on a graph input (shape arithmetic on static dims included) into initializers.

    Returns (model, nodes folded away). Overridable initializers (IR >= 4 graph inputs of the same name) are
    hidden from the folder, so nothing computed from them is frozen. The model is unchanged when folding fails.
    """
    import onnx_graphsurgeon as gs

    overridable = {i.name for i in model.graph.input}
    hidden = [t for t in model.graph.initializer if t.name in overridable]
    work = onnx.ModelProto()
    work.CopyFrom(model)
    if hidden:
        kept = [t for t in work.graph.initializer if t.name not in overridable]
        del work.graph.initializer[:]
        work.graph.initializer.extend(kept)
    before = len(work.graph.node)
    with quiet_third_party():
        try:
            graph = gs.import_onnx(work)
            graph.fold_constants(error_ok=True, should_exclude_node=lambda n: n.op in _NOT_FOLDED)
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            folded = gs.export_onnx(graph, do_type_check=False)
        except Exception:  # folding is an optimisation of the representation; the model stays valid without it
            return model, 0
    _copy_model_fields(model, folded)
    folded.graph.initializer.extend(hidden)
    count = before - len(folded.graph.node)
    try:
        onnx.checker.check_model(folded)
    except onnx.checker.ValidationError:
        return model, 0
    return (folded, count) if count > 0 else (model, 0)


def fold_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and dead-node removal only (onnxslim, its fusions off): for a model whose graph inputs
    are specialised to static shapes, every `Shape` subgraph becomes a constant. For analysis and for runtimes
    that import static graphs; QDQ weights may fold to float here (exact values), so passes never see the result.
    The model is returned unchanged when onnxslim fails on it."""
    import onnxslim

    with quiet_third_party():
        try:
            folded = onnxslim.slim(model, skip_optimizations=["graph_fusion", "subexpression_elimination",
                                                              "weight_tying"])
        except Exception:  # folding is an optimisation of the representation; the model stays valid without it
            return model
    return folded if isinstance(folded, onnx.ModelProto) else model


def _copy_model_fields(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    from optimizer.model import copy_model_fields

    copy_model_fields(source, target)


def _initializer_bytes(graph: onnx.GraphProto) -> int:
    return sum(int(np.prod(t.dims)) * _itemsize(t.data_type) for t in graph.initializer)


def _itemsize(data_type: int) -> int:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError):
        return 1


@contextlib.contextmanager
def quiet_third_party():
    """Silence onnx-graphsurgeon's logger and ONNX Runtime's default logger for the duration of the block.

    Their warnings ("you may want to set a constant-folding size threshold" with a MiB table, "colored module
    is not installed") describe their own internals, not the user's model; Sculpt reports what matters itself.
    """
    import logging

    import onnx_graphsurgeon as gs
    import onnxruntime as ort

    loggers = [gs.logger.G_LOGGER]
    with contextlib.suppress(ImportError):
        import onnxslim.third_party.onnx_graphsurgeon as slim_gs

        loggers.append(slim_gs.logger.G_LOGGER)
    saved = [(logger.severity, logger.colors) for logger in loggers]
    for logger in loggers:
        logger.severity, logger.colors = logger.ERROR, False
    slim_log = logging.getLogger("onnxslim")
    level = slim_log.level
    slim_log.setLevel(logging.ERROR)
    ort.set_default_logger_severity(4)  # fatal only, as optimizer.ort_session sets it for every Sculpt session
    try:
        with contextlib.redirect_stdout(_Discard()):  # onnxslim prints progress to stdout
            yield
    finally:
        for logger, (severity, colors) in zip(loggers, saved, strict=True):
            logger.severity, logger.colors = severity, colors
        slim_log.setLevel(level)


class _Discard:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
