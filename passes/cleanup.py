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

from optimizer.model import copy_model_fields
from passes import Pass, PassContext, PassResult, option, register

FOLDABLE_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


def _constant(tensor) -> np.ndarray | None:
    return tensor.values if isinstance(tensor, gs.Constant) else None


def fold_batchnorm(graph: gs.Graph) -> int:
    """Fold every BatchNormalization that follows a Conv/ConvTranspose/Gemm with constant weights. Returns count."""
    folded = 0
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        if len(bn.outputs) != 1 or not bn.inputs[0].inputs:
            continue
        producer = bn.inputs[0].inputs[0]
        params = [_constant(t) for t in bn.inputs[1:5]]
        if producer.op not in FOLDABLE_PRODUCERS or any(p is None for p in params):
            continue
        if len(bn.inputs[0].outputs) != 1 or bn.inputs[0] in graph.outputs:
            continue
        weight = _constant(producer.inputs[1])
        if weight is None or (len(producer.inputs) > 2 and _constant(producer.inputs[2]) is None):
            continue
        if producer.op == "Gemm" and (producer.attrs.get("transA", 0) or producer.attrs.get("alpha", 1.0) != 1.0
                                      or producer.attrs.get("beta", 1.0) != 1.0):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
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
        if bias.shape not in ((channels,), ()):
            continue
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
        folded += 1
    return folded


def remove_passthrough(graph: gs.Graph) -> int:
    """Bypass Identity nodes and inference-mode Dropout (its mask output unused). Returns count."""
    removed = 0
    for node in [n for n in graph.nodes if n.op in ("Identity", "Dropout")]:
        if node.op == "Dropout" and (len(node.outputs) > 1 and node.outputs[1].outputs or
                                     _training_mode(node)):
            continue
        source, target = node.inputs[0], node.outputs[0]
        if target in graph.outputs:
            if source in graph.inputs or source in graph.outputs or not source.inputs:
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
    return removed


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
    nodes_before = len(model.graph.node)
    graph = gs.import_onnx(model)
    graph.fold_constants(error_ok=True).cleanup()
    bn_before = sum(n.op == "BatchNormalization" for n in graph.nodes)
    passthrough = remove_passthrough(graph)
    folded = fold_batchnorm(graph) if fold_bn else 0
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
