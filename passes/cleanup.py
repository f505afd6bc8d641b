"""cleanup: constant folding, BatchNormalization folding, Identity/Dropout and dead-node removal (exact).

Folding uses onnx-graphsurgeon, which evaluates constant subgraphs (ConstantOfShape, Constant, Shape
arithmetic on static shapes...) with ONNX Runtime, so weights computed in the graph become initializers.
BatchNormalization after a Conv/ConvTranspose/Gemm whose output feeds nothing else is folded into its weight
and bias: y = γ·(Wx + b − μ)/√(σ² + ε) + β = (W·s)x + (b − μ)·s + β with s = γ/√(σ² + ε).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optimizer.declines import Decline
from optimizer.model import copy_model_fields
from passes import Pass, PassContext, PassResult, option, register

FOLDABLE_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


def _constant(tensor) -> np.ndarray | None:
    return tensor.values if isinstance(tensor, gs.Constant) else None


def fold_batchnorm(graph: gs.Graph) -> tuple[int, list[Decline]]:
    """Fold every BatchNormalization that follows a Conv/ConvTranspose/Gemm with constant weights.

    Returns how many were folded and a Decline for every one left in the graph."""
    folded, declines = 0, []
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        outcome = _fold_one(graph, bn)
        if isinstance(outcome, Decline):
            declines.append(outcome)
        else:
            folded += 1
    return folded, declines


def _foldable_producer(bn: gs.Node, graph: gs.Graph) -> gs.Node | Decline:
    """The Conv/ConvTranspose/Gemm `bn` can be folded into, or the Decline saying why it cannot."""
    def decline(code: str, why: str) -> Decline:
        return Decline(bn.name, bn.op, code, why)

    if len(bn.outputs) != 1:
        return decline("training-outputs", "its running-statistics outputs are used")
    if not bn.inputs[0].inputs:
        return decline("no-producer", "its input is a graph input, not a layer output")
    producer = bn.inputs[0].inputs[0]
    if producer.op not in FOLDABLE_PRODUCERS:
        return decline("producer-op", f"it follows {producer.op}, not Conv/ConvTranspose/Gemm")
    if any(_constant(t) is None for t in bn.inputs[1:5]):
        return decline("not-constant", "its scale, bias, mean or variance is not a constant")
    if len(bn.inputs[0].outputs) != 1 or bn.inputs[0] in graph.outputs:
        return decline("shared-input", f"the output of {producer.op} {producer.name!r} is also read elsewhere")
    if _constant(producer.inputs[1]) is None or (len(producer.inputs) > 2 and _constant(producer.inputs[2]) is None):
        return decline("not-constant", f"{producer.op} {producer.name!r} has a weight or bias that is not a constant")
    if producer.op == "Gemm" and (producer.attrs.get("transA", 0) or producer.attrs.get("alpha", 1.0) != 1.0
                                  or producer.attrs.get("beta", 1.0) != 1.0):
        return decline("gemm-attributes", f"Gemm {producer.name!r} has transA, alpha or beta set")
    channels = _constant(bn.inputs[1]).shape[0]
    bias = _constant(producer.inputs[2]) if len(producer.inputs) > 2 else np.zeros(channels)
    if bias.shape not in ((channels,), ()):
        return decline("bias-shape", f"the bias of {producer.op} {producer.name!r} has shape {list(bias.shape)}")
    return producer


def _fold_one(graph: gs.Graph, bn: gs.Node) -> gs.Node | Decline:
    """Fold `bn` into its producer and return the producer, or the Decline saying why not."""
    producer = _foldable_producer(bn, graph)
    if isinstance(producer, Decline):
        return producer
    weight = _constant(producer.inputs[1])
    gamma, beta, mean, var = (_constant(t).astype(np.float64) for t in bn.inputs[1:5])
    scale = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
    channels = scale.shape[0]
    if producer.op == "Conv":
        new_weight = weight * scale.reshape(-1, *[1] * (weight.ndim - 1))
    elif producer.op == "ConvTranspose":
        groups = producer.attrs.get("group", 1)
        per_group = weight.shape[1]
        grouped = weight.reshape(groups, weight.shape[0] // groups, per_group, *weight.shape[2:])
        grouped = grouped * scale.reshape(groups, 1, per_group, *[1] * (weight.ndim - 2))
        new_weight = grouped.reshape(weight.shape)
    elif producer.attrs.get("transB", 0):
        new_weight = weight * scale[:, None]
    else:
        new_weight = weight * scale[None, :]
    bias = _constant(producer.inputs[2]) if len(producer.inputs) > 2 else np.zeros(channels)
    new_bias = (bias.astype(np.float64) - mean) * scale + beta
    dtype = weight.dtype
    producer.inputs[1] = gs.Constant(f"{producer.inputs[1].name}_bnfold", new_weight.astype(dtype))
    bias_tensor = gs.Constant(f"{producer.name or producer.outputs[0].name}_bias_bnfold", new_bias.astype(dtype))
    if len(producer.inputs) > 2:
        producer.inputs[2] = bias_tensor
    else:
        producer.inputs.append(bias_tensor)
    producer.outputs = bn.outputs
    bn.outputs = []
    return producer


def remove_passthrough(graph: gs.Graph) -> tuple[int, list[Decline]]:
    """Bypass Identity nodes and inference-mode Dropout (its mask output unused).

    Returns how many were removed and a Decline for every one kept."""
    removed, declines = 0, []
    for node in [n for n in graph.nodes if n.op in ("Identity", "Dropout")]:
        if node.op == "Dropout" and (len(node.outputs) > 1 and node.outputs[1].outputs or
                                     _training_mode(node)):
            declines.append(Decline(node.name, node.op, "training-dropout",
                                    "its mask output is used or it runs in training mode"))
            continue
        source, target = node.inputs[0], node.outputs[0]
        if target in graph.outputs:
            if source in graph.inputs or source in graph.outputs or not source.inputs:
                declines.append(Decline(node.name, node.op, "output-alias",
                                        f"it copies {source.name!r} to the graph output {target.name!r}"))
                continue
            # keep the graph output's name: the producer of `source` now writes `target` directly
            for consumer in list(source.outputs):
                if consumer is not node:
                    consumer.inputs[consumer.inputs.index(source)] = target
            source.inputs[0].outputs[source.inputs[0].outputs.index(source)] = target
        else:
            for consumer in list(target.outputs):
                consumer.inputs[consumer.inputs.index(target)] = source
        node.inputs.clear()
        node.outputs.clear()
        removed += 1
    return removed, declines


def _training_mode(node: gs.Node) -> bool:
    if len(node.inputs) < 3:
        return False
    flag = _constant(node.inputs[2])
    return flag is None or bool(flag)


def cleanup_model(model: onnx.ModelProto, fold_bn: bool = True) -> onnx.ModelProto:
    """Fold constants, fold BatchNorm, remove Identity/Dropout and dead nodes (what other passes call first)."""
    return cleanup_with_details(model, fold_bn)[0]


def cleanup_with_details(model: onnx.ModelProto, fold_bn: bool = True) -> tuple[onnx.ModelProto, dict]:
    """cleanup_model, plus the counts the pass reports."""
    from optimizer.normalize import quiet_third_party

    nodes_before = len(model.graph.node)
    with quiet_third_party():  # graphsurgeon's folding warnings are about its internals, not the user's model
        graph = gs.import_onnx(model)
        graph.fold_constants(error_ok=True).cleanup()
        bn_before = sum(n.op == "BatchNormalization" for n in graph.nodes)
        passthrough, kept = remove_passthrough(graph)
        folded, unfolded = fold_batchnorm(graph) if fold_bn else (0, [])
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        graph.fold_constants(error_ok=True).cleanup()
        cleaned = gs.export_onnx(graph, do_type_check=True)
    copy_model_fields(model, cleaned)
    details = {
        "batchnorm_folded": folded,
        "batchnorm_left": bn_before - folded,
        "identity_dropout_removed": passthrough,
        "nodes_before": nodes_before,
        "nodes_after": len(cleaned.graph.node),
        "constant_nodes_left": sum(n.op_type == "Constant" for n in cleaned.graph.node),
        "declined": [d.as_report() for d in [*kept, *unfolded]],
    }
    return cleaned, details


@register
class Cleanup(Pass):
    name = "cleanup"
    summary = "constant folding, BatchNorm folding into Conv/ConvTranspose/Gemm, Identity/Dropout/dead-node removal"
    contract = "exact"

    @dataclass(frozen=True)
    class Options:
        fold_batchnorm: bool = option(True, "fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm")

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        return PassResult(*cleanup_with_details(model, fold_bn=self.options.fold_batchnorm))
