"""Pruning plans: which channels each group keeps, saved as JSON and applied again to a re-export.

A plan is bound to a model's structure by `structure_fingerprint` (op types, weight shapes, I/O shapes), so a
re-export of the same architecture accepts it and another model is refused with a usage error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from optimizer.errors import UsageError
from passes.graph.groups import Analysis
from passes.graph.selection import STATUS_PRUNED, Decision, restore_nonempty

PLAN_FORMAT = "sculpt.structured-sparse.plan/1"


def plan_payload(analysis: Analysis, decisions: list[Decision], settings: dict) -> dict:
    return {
        "format": PLAN_FORMAT,
        "fingerprint": analysis.fingerprint,
        "settings": settings,
        "groups": [
            {"id": d.group.id, "producers": d.group.producers, "channels": d.group.channels, "kept": d.kept}
            for d in decisions
            if d.status == STATUS_PRUNED
        ],
    }


def read_plan(path: str) -> dict:
    """Load and sanity-check a plan file; UsageError naming the option on any problem."""
    where = f"pass structured-sparse: option plan={path}"
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{where}: no such file")
    try:
        plan = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{where}: not a readable JSON plan ({e})") from None
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT or not isinstance(plan.get("groups"), list):
        raise UsageError(
            f"{where}: not a structured-sparse plan (expected format {PLAN_FORMAT!r}, as written by plan_out)"
        )
    return plan


def decisions_from_plan(analysis: Analysis, plan: dict, path: str, scores: dict[int, np.ndarray]) -> list[Decision]:
    where = f"pass structured-sparse: option plan={path}"
    if plan.get("fingerprint") != analysis.fingerprint:
        raise UsageError(
            f"{where} was made for a different model (structure fingerprint {plan.get('fingerprint')} "
            f"!= {analysis.fingerprint}); re-create it with plan_out on this model"
        )
    decisions = [Decision(g, np.ones(g.channels, dtype=bool), scores[g.id]) for g in analysis.groups]
    by_id = {d.group.id: d for d in decisions}
    for entry in plan["groups"]:
        decision = by_id.get(entry.get("id"))
        if (
            decision is None
            or entry.get("channels") != decision.group.channels
            or entry.get("producers") != decision.group.producers
        ):
            raise UsageError(f"{where}: group {entry.get('id')} ({entry.get('producers')}) does not match this model")
        kept = entry.get("kept")
        if (
            not isinstance(kept, list)
            or not kept
            or not all(isinstance(i, int) and 0 <= i < decision.group.channels for i in kept)
        ):
            raise UsageError(f"{where}: group {entry['id']} has an invalid kept list")
        decision.keep[:] = False
        decision.keep[kept] = True
        blocked = ~decision.keep & ~decision.group.prunable
        if blocked.any():
            reason = decision.group.blocked[int(np.flatnonzero(blocked)[0])][0]
            raise UsageError(f"{where}: group {entry['id']} removes channels that cannot be removed ({reason})")
        decision.status = STATUS_PRUNED
    restore_nonempty(analysis, decisions)
    return decisions
