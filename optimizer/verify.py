"""Numeric comparison of two models' outputs, and top-1 accuracy, with ONNX Runtime as the reference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from optimizer.data import feed_in_chunks, fixed_batch, graph_inputs, split_labels
from optimizer.errors import VerificationError
from optimizer.ort_session import ort_session, run_outputs


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], threads: int | None = None) -> dict[str, np.ndarray]:
    """The model's outputs (name -> array, in output order) on ONNX Runtime's CPU provider; more samples than a
    fixed batch are fed in chunks (optimizer.data.feed_in_chunks)."""
    session = ort_session(model, threads)
    return feed_in_chunks(lambda part: run_outputs(session, part), feeds, fixed_batch(graph_inputs(model)))


# what can make class scores over the last axis: a classifier's last layer or the Softmax after it, with
# shape-only ops in between looked through. A Conv or Sigmoid output is a map (a segmentation, a detector's
# grid) unless it is 2-D; an embedding (normalised, pooled, layer-normed) or concatenated boxes are none of
# these, and the argmax over their last axis means nothing.
_LAST_AXIS_SCORES = {"Softmax", "LogSoftmax", "Gemm", "MatMul"}
_SCORES_WHEN_2D = {"Conv", "Sigmoid"}
_SHAPE_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Cast"}


def class_score_outputs(model: onnx.ModelProto) -> list[bool]:
    """Per graph output (in order): whether it holds class scores, so that top-1 agreement means something.

    An output counts when the node that makes it (through reshapes and casts) is a Softmax/LogSoftmax, a
    Gemm/MatMul or the Add of a bias onto one, or, for a 2-D output, a Conv or Sigmoid.

        >>> from onnx import helper, TensorProto as T
        >>> g = helper.make_graph([helper.make_node("Softmax", ["x"], ["p"]),
        ...                        helper.make_node("LpNormalization", ["x"], ["e"])], "g",
        ...                       [helper.make_tensor_value_info("x", T.FLOAT, [1, 4])],
        ...                       [helper.make_tensor_value_info("p", T.FLOAT, [1, 4]),
        ...                        helper.make_tensor_value_info("e", T.FLOAT, [1, 4])])
        >>> class_score_outputs(helper.make_model(g))
        [True, False]
    """
    producer = {out: node for node in model.graph.node for out in node.output}

    def source(name: str) -> onnx.NodeProto | None:
        node = producer.get(name)
        for _ in range(8):
            if node is None or node.op_type not in _SHAPE_OPS:
                break
            node = producer.get(node.input[0])
        if node is not None and node.op_type == "Add":  # a bias onto a linear layer's output
            linear = [source(i) for i in node.input if i in producer]
            node = next((n for n in linear if n is not None and n.op_type in ("Gemm", "MatMul", "Conv")), None)
        return node

    marks = []
    for output in model.graph.output:
        node = source(output.name)
        rank = len(output.type.tensor_type.shape.dim) if output.type.tensor_type.HasField("shape") else None
        marks.append(node is not None and (node.op_type in _LAST_AXIS_SCORES
                                           or node.op_type in _SCORES_WHEN_2D and rank == 2))
    return marks


def class_score_marks(class_scores: list[bool] | None, count: int) -> list[bool]:
    """The per-output marks to use for `count` outputs: `class_scores` when it covers them, else every output
    (without a model to read, any output with more than one column may hold classes).

        >>> class_score_marks([True, False], 2), class_score_marks(None, 2)
        ([True, False], [True, True])
    """
    return class_scores if class_scores is not None and len(class_scores) == count else [True] * count


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
            class_scores: list[bool] | None = None) -> dict:
    """Worst case over outputs (matched by position: passes may rename outputs but never reorder them).

    max_rel_err is relative to the reference output's scale (max |ref|), so that near-zero elements do not
    dominate; cosine is over the flattened outputs; top1_agreement compares argmax over the last axis of
    outputs whose last axis has more than one class, and only of the outputs `class_scores` marks (from
    `class_score_outputs`) when it is given; None when no output qualifies. NaN/Inf in either side's outputs
    make the comparison meaningless: the result then carries `nonfinite` counts, errors of inf and
    cosine/agreement 0, and `failure` says why (the pipeline fails on it). Raises VerificationError when there
    is nothing to compare.

        >>> compare({"y": np.ones((2, 3))}, {"y": np.ones((2, 3))})["cosine"]
        1.0
    """
    if len(reference) != len(candidate):
        raise VerificationError(f"output count differs: {len(reference)} vs {len(candidate)}")
    if not reference or all(np.size(v) == 0 for v in reference.values()):
        raise VerificationError("nothing to compare: the outputs hold no values (zero samples?)")
    nonfinite = _nonfinite_counts(reference, candidate)
    if nonfinite["reference"] or nonfinite["candidate"]:
        return {"max_abs_err": float("inf"), "max_rel_err": float("inf"), "cosine": 0.0, "top1_agreement": 0.0,
                "nonfinite": nonfinite, "failure": _nonfinite_message(nonfinite)}
    max_abs = max_rel = 0.0
    cosine, agreement = 1.0, None
    marks = class_score_marks(class_scores, len(reference))
    for ref, new, is_scores in zip(reference.values(), candidate.values(), marks, strict=True):
        ref = np.asarray(ref, dtype=np.float64)
        new = np.asarray(new, dtype=np.float64)
        if ref.shape != new.shape:
            return {"max_abs_err": float("inf"), "max_rel_err": float("inf"), "cosine": 0.0, "top1_agreement": 0.0,
                    "shape_mismatch": [list(ref.shape), list(new.shape)],
                    "failure": f"output shape changed from {list(ref.shape)} to {list(new.shape)}"}
        diff = np.abs(ref - new)
        err = float(diff.max(initial=0.0))
        scale = float(np.abs(ref).max(initial=0.0))
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / scale if scale > 0 else err)
        norms = np.linalg.norm(ref) * np.linalg.norm(new)
        cosine = min(cosine, float(np.dot(ref.ravel(), new.ravel()) / norms) if norms > 0 else float(err == 0))
        if is_scores and ref.ndim >= 2 and ref.shape[-1] > 1:
            same = float(np.mean(ref.argmax(-1) == new.argmax(-1)))
            agreement = same if agreement is None else min(agreement, same)
    return {"max_abs_err": max_abs, "max_rel_err": max_rel, "cosine": cosine, "top1_agreement": agreement}


def _nonfinite_counts(reference: dict, candidate: dict) -> dict[str, int]:
    def count(outputs):
        return sum(int(np.size(v) - np.isfinite(v).sum()) for v in outputs.values()
                   if np.asarray(v).dtype.kind in "fc")

    return {"reference": count(reference), "candidate": count(candidate)}


def _nonfinite_message(nonfinite: dict[str, int]) -> str:
    if nonfinite["reference"]:
        return (f"the reference model's outputs hold {nonfinite['reference']} NaN/Inf values on the verification "
                "inputs, so nothing can be compared")
    return f"the new model's outputs hold {nonfinite['candidate']} NaN/Inf values on the verification inputs"


@dataclass(frozen=True)
class QualityFloor:
    """Below these an approximate pass is reported loudly (`--strict`: the run fails and writes nothing).

    min_cosine 0.99 and min_agreement 0.95 (top-1 of the pass's output against its input's, on the
    verification inputs): 8-bit quantization of the digits CNN stays at cosine 0.99996 and agreement 1.0, so a
    pass below the floor has changed the model far more than a careful compression step does.

        >>> QualityFloor().shortfall({"cosine": 0.13, "top1_agreement": 0.4})
        'cosine 0.130000 < 0.99, top-1 agreement 0.4000 < 0.95'
    """

    min_cosine: float = 0.99
    min_agreement: float = 0.95

    def shortfall(self, verify: dict) -> str | None:
        """What fell below the floor, or None."""
        parts = []
        if verify["cosine"] < self.min_cosine:
            parts.append(f"cosine {verify['cosine']:.6f} < {self.min_cosine:g}")
        agreement = verify.get("top1_agreement")
        if agreement is not None and agreement < self.min_agreement:
            parts.append(f"top-1 agreement {agreement:.4f} < {self.min_agreement:g}")
        return ", ".join(parts) or None


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows of `logits` ([N, classes], or [N, ...] flattened per sample) whose argmax is the label.

        top1(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1]))   # 0.5
    """
    labels = np.asarray(labels).reshape(-1)
    return float(np.mean(np.asarray(logits).reshape(len(labels), -1).argmax(-1) == labels))


def top1_accuracy(model: onnx.ModelProto, evaluation: dict[str, np.ndarray]) -> float:
    """Top-1 of the model's first output on ONNX Runtime against the evaluation data's `labels`."""
    feeds, labels = split_labels(evaluation)
    if labels is None:
        raise ValueError("evaluation data has no 'labels' array")
    return top1(next(iter(run_ort(model, feeds).values())), labels)
