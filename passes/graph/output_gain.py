"""Output gain: how much of a group's local error reaches the model's outputs, measured once per group.

The sensitivities of `data_scores` and `reconstruction` are relative errors at a group's consumers. The same
number in an early, narrow layer and at the classifier's input does not hurt the outputs equally: a budget
that ranks units by local error alone spares the early layers (where the MACs are) and takes everything from
the last ones. So for every prunable group the lowest-ranked quarter of its units is removed (no refit) and
the model runs on a few calibration samples; the group's gain is the relative squared error of the model's
outputs (logits where a Softmax makes an output) divided by the relative squared error its consumers were
predicted to see for those units (the activation sensitivity, sum of ||W[:, p]||^2 ||X_p||^2 / ||Y||^2).
Budgets then rank units by sensitivity x gain.

    >>> gains = output_gains(prepared, stats, scores, feeds)     # doctest: +SKIP
    >>> sens = {gid: s * gains.get(gid, 1.0) for gid, s in sens.items()}    # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import onnx

from passes.graph import activations
from passes.graph.data_scores import activation_scores
from passes.graph.groups import analyze
from passes.graph.prune import apply_removal

PROBE_FRACTION = 0.25  # of a group's prunable units, removed to measure its gain
PROBE_SAMPLES = 16  # calibration samples each probe runs (the first ones)


def _relative_error(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> float:
    total = 0.0
    for name, ref in reference.items():
        ref64 = ref.astype(np.float64)
        total += float(np.sum((candidate[name].astype(np.float64) - ref64) ** 2) / max(np.sum(ref64 ** 2), 1e-30))
    return total


SQUASHING = ("Softmax", "LogSoftmax", "Sigmoid")


def measured_tensors(model: onnx.ModelProto) -> list[str]:
    """The graph outputs, or for an output a Softmax/LogSoftmax/Sigmoid makes, its input (the logits): a saturated
    softmax hides every change short of a flipped class, which would make each probe read zero."""
    producers = {out: node for node in model.graph.node for out in node.output}
    names = []
    for output in model.graph.output:
        node = producers.get(output.name)
        names.append(node.input[0] if node is not None and node.op_type in SQUASHING else output.name)
    return list(dict.fromkeys(names))


def output_gains(prepared: onnx.ModelProto, stats, scores: dict[int, np.ndarray], feeds: dict[str, np.ndarray],
                 samples: int = PROBE_SAMPLES) -> dict[int, float]:
    """group id -> output gain (see the module doc), for every prunable group whose probe predicts an error;
    groups without one are left out (callers use the median gain for them)."""
    analysis = analyze(prepared)
    predicted_local = activation_scores(analysis, stats)
    take = min(samples, len(next(iter(feeds.values()))))
    subset = {name: value[:take] for name, value in feeds.items()}
    names = measured_tensors(prepared)
    wanted = activations.collect(prepared, subset, names)
    gains = {}
    for group in analysis.groups:
        candidates = np.flatnonzero(group.prunable)
        if not len(candidates):
            continue
        order = candidates[np.argsort(scores[group.id][candidates], kind="stable")]
        units = order[: max(1, round(PROBE_FRACTION * len(candidates)))]
        predicted = float(predicted_local[group.id][1][units].sum())
        if not predicted > 0:
            continue
        probe = analyze(prepared)  # an Analysis serves one removal; analyze is deterministic, so ids match
        pruned, _ = apply_removal(probe, {int(probe.groups[group.id].roots[u]) for u in units})
        gains[group.id] = _relative_error(wanted, activations.collect(pruned, subset, names)) / predicted
    return gains


def scaled(sens: dict[int, np.ndarray], gains: dict[int, float]) -> dict[int, np.ndarray]:
    """Sensitivities times each group's gain; a group without a measured gain takes the median one."""
    if not gains:
        return sens
    fallback = float(np.median(list(gains.values())))
    return {gid: values * gains.get(gid, fallback) for gid, values in sens.items()}
