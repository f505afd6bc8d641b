"""How much of the model a pruning kept, and how close the pruned model stays to the original.

weights_kept counts every floating-point initializer element (embedding tables included: a Gather's table is
a weight the model ships); weights_kept_without_embeddings leaves out the tables read by Gather, which no
channel pruning can shrink along their vocabulary axis, so both are reported. macs_kept follows the report's
MAC count (Conv, ConvTranspose, Gemm, MatMul with a constant weight, batch 1), with a Constant node's weight
counted like an initializer.
"""

from __future__ import annotations

import numpy as np
import onnx

from optimizer import verify
from optimizer.model import FLOAT_TYPES
from passes.graph import activations


def weight_counts(model: onnx.ModelProto) -> tuple[int, int]:
    """(float weight elements: initializers and Constant-node tensors, the part held by Gather tables)."""
    tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input}
    tensors = [(t.name, t) for t in model.graph.initializer]
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            tensors += [(node.output[0], a.t) for a in node.attribute if a.name == "value"]
    total = embed = 0
    for name, t in tensors:
        if t.data_type in FLOAT_TYPES:
            size = int(np.prod(t.dims))
            total += size
            embed += size if name in tables else 0
    return total, embed


def top1(model: onnx.ModelProto, inputs: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """Top-1 accuracy of the model's first output on `inputs` (fed in chunks the model accepts)."""
    logits = next(iter(activations.collect(model, inputs).values()))
    return verify.top1(logits, labels.reshape(-1)[:len(logits)])


def agreement(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
              class_scores: list[bool] | None = None) -> dict:
    """Cosine (per sample, averaged, worst output) and top-1 agreement (first output with classes; only outputs
    that `class_scores` marks, see verify.class_score_outputs, when it is given)."""
    cosines, top1 = [], None
    marks = verify.class_score_marks(class_scores, len(reference))
    for ref, new, is_scores in zip(reference.values(), candidate.values(), marks, strict=True):
        a = ref.reshape(len(ref), -1).astype(np.float64)
        b = new.reshape(len(new), -1).astype(np.float64)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosines.append(float(np.mean(np.where(norms > 0, (a * b).sum(1) / np.maximum(norms, 1e-30), 1.0))))
        if top1 is None and is_scores and ref.ndim >= 2 and ref.shape[-1] > 1:
            top1 = float(np.mean(ref.argmax(-1) == new.argmax(-1)))
    return {"cosine": round(min(cosines), 6), "top1_agreement": None if top1 is None else round(top1, 6)}


def fidelity_summary(model: onnx.ModelProto, prepared: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict | None,
                     evaluation: dict | None, estimate: list[float] | None, budget: list[tuple[str, float]] | None,
                     reference: dict[str, np.ndarray] | None = None, embeddings: bool = True) -> dict:
    """The model-level numbers of the pass report (see the module doc). MACs are counted on `prepared` (the input
    cleaned, so weights held in Constant nodes count) and on the pruned model."""
    from optimizer.report import model_stats

    before, before_embed = weight_counts(model)
    after, after_embed = weight_counts(pruned)
    shapes = activations.sample_shapes(feeds)  # dynamic dims take the calibration data's sizes, as the budget does
    macs_before = model_stats(prepared, input_shapes=shapes)["macs"]
    macs_after = model_stats(pruned, input_shapes=shapes)["macs"]
    summary = {
        "weights_kept": round(after / before, 4) if before else 1.0,
        "weights_kept_without_embeddings": round((after - after_embed) / (before - before_embed), 4)
        if before > before_embed else 1.0,
        # None when no MAC can be counted (dynamic spatial dims leave the layers' output shapes unknown)
        "macs_kept": round(macs_after / macs_before, 4) if macs_before else None,
    }
    if budget is not None:
        entries = []
        for index, (metric, fraction) in enumerate(budget):
            reached = summary[("weights_kept" if embeddings else "weights_kept_without_embeddings")
                              if metric == "params" else "macs_kept"]
            entries.append({"metric": metric, "target": fraction,
                            "estimated": None if estimate is None else round(float(estimate[index]), 4),
                            "reached": reached})
        summary["budget"] = entries[0]  # the weights budget when both are given
        if len(entries) > 1:
            summary["budgets"] = entries
    class_scores = verify.class_score_outputs(model)
    if feeds is not None:
        reference = reference if reference is not None else activations.collect(model, feeds)
        summary["calibration"] = agreement(reference, activations.collect(pruned, feeds), class_scores)
    if evaluation is not None:
        inputs = {k: v for k, v in evaluation.items() if k != "labels"}
        ref, new = activations.collect(model, inputs), activations.collect(pruned, inputs)
        entry = agreement(ref, new, class_scores)
        labels = evaluation.get("labels")
        if labels is not None:
            def top1(out: dict) -> float:
                logits = next(iter(out.values()))
                return round(float(np.mean(logits.reshape(len(logits), -1).argmax(-1)
                                           == labels.reshape(-1)[:len(logits)])), 6)

            entry["top1_before"], entry["top1_after"] = top1(ref), top1(new)
        summary["eval"] = entry
    return summary
