"""Which units to remove: by ratio (per group or one global ranking), or exactly the provably dead ones."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from passes.graph.channels import OPAQUE
from passes.graph.groups import Analysis, Group

STATUS_PRUNED, STATUS_UNCHANGED, STATUS_DECLINED, STATUS_EXCLUDED = "pruned", "unchanged", "declined", "excluded"


@dataclass
class Decision:
    """The fate of one group: `keep[i]` for unit i (canonical order), and why nothing was removed if so."""

    group: Group
    keep: np.ndarray
    scores: np.ndarray
    status: str = STATUS_UNCHANGED
    why: str | None = None

    @property
    def kept(self) -> list[int]:
        return np.flatnonzero(self.keep).tolist()


@dataclass(frozen=True)
class Targets:
    ratio: float
    scope: str
    round_to: int | None  # None: auto, see `step`
    min_channels: int
    exact_only: bool


# ONNX Runtime's blocked (NCHWc) convolutions and vectorised GEMMs want widths that are multiples of 8: measured on
# PP-LCNet (benchmarks/accuracy_recovery.py), a 30% cut with free widths ran 0.82x as fast as the original, the same
# cut rounded to multiples of 8 1.40x
ALIGN = 8


def step(group, targets: Targets) -> int:
    """The multiple a group keeps: round_to, or with round_to=auto ALIGN for Conv-made groups of at least
    4 * ALIGN units whose width is already aligned (ORT's GEMMs run any width well; exact-only removal keeps
    nothing extra, and scope=global removes exactly `ratio` of all channels), else 1."""
    if targets.round_to is not None:
        return targets.round_to
    n = group.channels
    convolutional = all(source.op in ("Conv", "ConvTranspose") for source in group.sources)
    free = targets.exact_only or targets.scope == "global"
    return ALIGN if not free and convolutional and n >= 4 * ALIGN and n % ALIGN == 0 else 1


def _rounded_keep(group, keep: int, targets: Targets) -> int:
    """`keep` raised to min_channels and rounded up to a multiple of the group's step, never above its width."""
    least = max(keep, targets.min_channels, 1)
    multiple = step(group, targets)
    return min(group.channels, math.ceil(least / multiple) * multiple)


def _remove_lowest(decision: Decision, candidates: np.ndarray, count: int) -> None:
    order = [i for i in np.argsort(decision.scores, kind="stable") if candidates[i]]
    decision.keep[order[: max(count, 0)]] = False


def _round(decision: Decision, targets: Targets) -> None:
    """Give units back (best first) until the kept count is a multiple of round_to and at least min_channels."""
    kept = int(decision.keep.sum())
    wanted = _rounded_keep(decision.group, kept, targets)
    removed = [i for i in np.argsort(-decision.scores, kind="stable") if not decision.keep[i]]
    decision.keep[removed[: wanted - kept]] = True


def initial(analysis: Analysis, scores: dict[int, np.ndarray], excluded: dict[int, str]) -> list[Decision]:
    """One decision per group, everything kept; excluded and unprunable groups get their status and reason."""
    decisions = []
    for group in analysis.groups:
        decision = Decision(group, np.ones(group.channels, dtype=bool), scores[group.id])
        if group.id in excluded:
            decision.status, decision.why = STATUS_EXCLUDED, excluded[group.id]
        elif not group.prunable.any():
            decision.status, decision.why = STATUS_DECLINED, "; ".join(map(str, group.reasons()))
        decisions.append(decision)
    return decisions


def finish(analysis: Analysis, decisions: list[Decision], targets: Targets) -> None:
    """round_to / min_channels on every open group, then no tensor left without channels."""
    for decision in decisions:
        if decision.status == STATUS_UNCHANGED:
            _round(decision, targets)
    restore_nonempty(analysis, decisions)


def settle(decisions: list[Decision]) -> list[Decision]:
    """Final statuses: pruned where something goes, else a reason why nothing does."""
    for decision in decisions:
        if decision.status == STATUS_UNCHANGED and not decision.keep.all():
            decision.status = STATUS_PRUNED
        elif decision.status == STATUS_UNCHANGED and decision.why is None:
            decision.why = "nothing to remove at this ratio, round_to and min_channels"
    return decisions


def choose(
    analysis: Analysis, scores: dict[int, np.ndarray], targets: Targets, excluded: dict[int, str]
) -> list[Decision]:
    decisions = initial(analysis, scores, excluded)
    for decision in decisions:
        group = decision.group
        candidates = group.exact if targets.exact_only else group.prunable
        if decision.status != STATUS_UNCHANGED:
            continue
        if targets.exact_only:
            decision.keep[candidates] = False
            _round(decision, targets)
            if decision.keep.all():
                decision.why = "no channel of this group can be removed without changing the outputs"
        elif targets.scope == "uniform":
            n = group.channels
            keep = _rounded_keep(group, n - int(math.floor(targets.ratio * n + 1e-9)), targets)
            _remove_lowest(decision, candidates, n - keep)
            _round(decision, targets)
    if targets.scope == "global" and not targets.exact_only:
        _choose_globally(decisions, targets)
    restore_nonempty(analysis, decisions)
    return settle(decisions)


def _choose_globally(decisions: list[Decision], targets: Targets) -> None:
    """One ranking over all groups, each group's scores divided by their mean so layers compare."""
    open_decisions = [d for d in decisions if d.status == STATUS_UNCHANGED]
    ranked = []
    for d, decision in enumerate(open_decisions):
        candidates = decision.group.prunable
        mean = decision.scores[candidates].mean() if candidates.any() else 0.0
        normalized = decision.scores / mean if mean > 0 else decision.scores
        ranked += [(normalized[i], d, i) for i in np.flatnonzero(candidates)]
    total = sum(d.group.channels for d in open_decisions)
    budget = int(math.floor(targets.ratio * total + 1e-9))
    for _, d, i in sorted(ranked):
        if budget <= 0:
            break
        decision = open_decisions[d]
        if decision.keep.sum() - 1 >= max(targets.min_channels, 1):
            decision.keep[i] = False
            budget -= 1
    for decision in open_decisions:
        _round(decision, targets)


def removed_roots(decisions: list[Decision]) -> set[int]:
    return {int(r) for d in decisions for r in d.group.roots[~d.keep]}


def restore_nonempty(analysis: Analysis, decisions: list[Decision]) -> None:
    """No tensor may lose all its channels (a Split piece, one input of a Concat): give one unit back there."""
    where = {int(r): (d, i) for d in decisions for i, r in enumerate(d.group.roots)}
    removed = removed_roots(decisions)
    for space in analysis.state.spaces.values():
        if not len(space) or np.any(space.ids == OPAQUE):
            continue
        roots = analysis.root_ids(space.ids)
        if all(int(r) in removed for r in roots):
            decision, index = max((where[int(r)] for r in set(roots.tolist())), key=lambda di: di[0].scores[di[1]])
            decision.keep[index] = True
            removed.discard(int(decision.group.roots[index]))
            if decision.keep.all():
                decision.why = "kept whole: removing its removable channels would leave a tensor with none"
