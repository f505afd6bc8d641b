"""Numeric comparison of two models' outputs, and top-1 accuracy, with ONNX Runtime as the reference."""

from __future__ import annotations

import numpy as np
import onnx

from optimizer.data import feed_in_chunks, fixed_batch, graph_inputs, split_labels
from optimizer.ort_session import ort_session, run_outputs


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], threads: int | None = None) -> dict[str, np.ndarray]:
    """The model's outputs (name -> array, in output order) on ONNX Runtime's CPU provider; more samples than a
    fixed batch are fed in chunks (optimizer.data.feed_in_chunks)."""
    session = ort_session(model, threads)
    return feed_in_chunks(lambda part: run_outputs(session, part), feeds, fixed_batch(graph_inputs(model)))


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict:
    """Worst case over outputs (matched by position: passes may rename outputs but never reorder them).

    max_rel_err is relative to the reference output's scale (max |ref|), so that near-zero elements do not
    dominate; cosine is over the flattened outputs; top1_agreement compares argmax over the last axis of
    outputs whose last axis has more than one class.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"output count differs: {len(reference)} vs {len(candidate)}")
    max_abs = max_rel = 0.0
    cosine, agreement = 1.0, None
    for ref, new in zip(reference.values(), candidate.values(), strict=True):
        ref = np.asarray(ref, dtype=np.float64)
        new = np.asarray(new, dtype=np.float64)
        if ref.shape != new.shape:
            return {"max_abs_err": float("inf"), "max_rel_err": float("inf"), "cosine": 0.0, "top1_agreement": 0.0,
                    "shape_mismatch": [list(ref.shape), list(new.shape)]}
        diff = np.abs(ref - new)
        err = float(diff.max(initial=0.0))
        scale = float(np.abs(ref).max(initial=0.0))
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / scale if scale > 0 else err)
        norms = np.linalg.norm(ref) * np.linalg.norm(new)
        cosine = min(cosine, float(np.dot(ref.ravel(), new.ravel()) / norms) if norms > 0 else float(err == 0))
        if ref.ndim >= 2 and ref.shape[-1] > 1:
            same = float(np.mean(ref.argmax(-1) == new.argmax(-1)))
            agreement = same if agreement is None else min(agreement, same)
    return {"max_abs_err": max_abs, "max_rel_err": max_rel, "cosine": cosine, "top1_agreement": agreement}


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
