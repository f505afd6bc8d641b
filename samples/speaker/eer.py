"""Speaker verification scoring: cosine similarity between embeddings and the equal error rate (no PLDA).

Trials are every unordered pair of held-out utterances; a pair is a target trial when both come from
the same speaker. The EER is where the false-acceptance rate (non-target scored >= threshold) equals the
false-rejection rate (target scored < threshold), interpolated linearly between neighbouring thresholds.

Hand case: target scores [0.9, 0.8, 0.3], non-target [0.7, 0.2, 0.1] -> at threshold 0.7 one of three
targets is rejected and one of three non-targets accepted, so the EER is 1/3.
"""

from __future__ import annotations

import numpy as np


def cosine_scores(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores, is_target) over all pairs i < j of [utterances, dim] embeddings."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(min=1e-12)
    first, second = np.triu_indices(len(unit), k=1)
    scores = np.einsum("ij,ij->i", unit[first], unit[second])
    return scores, labels[first] == labels[second]


def equal_error_rate(scores: np.ndarray, is_target: np.ndarray) -> float:
    """EER as a fraction in [0, 1]; needs at least one target and one non-target trial."""
    is_target = np.asarray(is_target, dtype=bool)
    n_target, n_nontarget = int(is_target.sum()), int((~is_target).sum())
    if n_target == 0 or n_nontarget == 0:
        raise ValueError(f"EER needs both kinds of trials, got {n_target} target and {n_nontarget} non-target")
    order = np.argsort(-np.asarray(scores), kind="stable")
    sorted_scores, sorted_target = np.asarray(scores)[order], is_target[order]
    # Operating points after accepting every trial scored >= each distinct score (highest first).
    last_of_tie = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    accepted_targets = np.cumsum(sorted_target)[last_of_tie]
    accepted_nontargets = np.cumsum(~sorted_target)[last_of_tie]
    false_accept = np.r_[0.0, accepted_nontargets / n_nontarget]
    false_reject = np.r_[1.0, 1.0 - accepted_targets / n_target]
    # false_reject - false_accept falls from 1 to -1; find where it crosses zero.
    gap = false_reject - false_accept
    k = int(np.argmax(gap <= 0))
    if gap[k] == 0:
        return float(false_accept[k])
    weight = gap[k - 1] / (gap[k - 1] - gap[k])
    return float(false_accept[k - 1] + weight * (false_accept[k] - false_accept[k - 1]))
