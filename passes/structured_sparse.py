"""structured-sparse: remove whole channels, filters and neurons from any ONNX graph.

The model is cleaned first (constant folding, BatchNorm folding) so weights are initializers, then the
channel-dependency analysis of `passes.graph` groups the channels that must go together. Each group is pruned
by importance (ratio, uniform or global), or, with criterion=zero, exactly the units whose removal provably
leaves every output unchanged (then the pass is `exact`). The report lists every group: members, channels
before/after, the kept indices, an importance summary, and for each group left alone, why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx

from optimizer.errors import UsageError
from optimizer.io_json import to_json
from passes import Artifact, Pass, PassContext, PassResult, option, register
from passes.base import compile_regex
from passes.cleanup import cleanup_model
from passes.graph.groups import Analysis, analyze
from passes.graph.importance import CRITERIA, batchnorm_scales, summary, unit_scores
from passes.graph.ir import with_shapes
from passes.graph.plan import decisions_from_plan, plan_payload, read_plan
from passes.graph.prune import apply_removal, kept_counts
from passes.graph.selection import STATUS_PRUNED, Decision, Targets, choose, removed_roots

NAME = "structured-sparse"


def count_params(model: onnx.ModelProto) -> int:
    """Elements in floating-point initializers (weights and biases)."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in floats)


def without_initializer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Older exporters list every weight as a graph input too (keep_initializers_as_inputs), which would make it
    overridable and so not a constant; such inputs are dropped, as onnxruntime's tools recommend."""
    weights = {t.name for t in model.graph.initializer}
    if not any(value.name in weights for value in model.graph.input):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept = [value for value in copy.graph.input if value.name not in weights]
    del copy.graph.input[:]
    copy.graph.input.extend(kept)
    return copy


def prepare(model: onnx.ModelProto, rounds: int = 3) -> onnx.ModelProto:
    """cleanup; when the graph reads shapes, alternate it with shape inference until no more Shape/Size folds,
    because each folding can make more shapes static (a Slice bound computed from a Shape, then the next)."""
    def shape_reads(m: onnx.ModelProto) -> int:
        return sum(node.op_type in ("Shape", "Size") for node in m.graph.node)

    cleaned = cleanup_model(without_initializer_inputs(model))
    for _ in range(rounds):
        reads = shape_reads(cleaned)
        if not reads:
            break
        cleaned = cleanup_model(with_shapes(cleaned))
        if shape_reads(cleaned) == reads:
            break
    return cleaned


@register
class StructuredSparse(Pass):
    name = NAME
    summary = "removes whole channels/filters/neurons and rewires every producer and consumer"
    contract = "approximate"

    @dataclass(frozen=True)
    class Options:
        ratio: float = option(0.5, "fraction of each group's channels to remove, 0 <= ratio < 1 (unused by zero)")
        criterion: Literal["l1", "l2", "bn-scale", "hoyer", "zero"] = option(
            "l1",
            "importance: l1/l2 norm of producer rows, bn-scale |gamma|, hoyer (Group-HS normalized l2), or "
            "zero = remove only channels whose removal provably leaves the outputs unchanged (exact)",
        )
        scope: Literal["uniform", "global"] = option("uniform", "ratio per group, or one ranking across groups")
        round_to: int = option(1, "keep a multiple of this many channels in each group")
        min_channels: int = option(1, "keep at least this many channels in each group")
        exclude: str | None = option(None, "regex on the names of the nodes producing a group: matches are kept")
        plan: str | None = option(None, "apply a plan saved with plan_out (a re-export of the same model)")
        plan_out: str | None = option(None, "write the plan (groups and kept channels) to this JSON file")

    def validate(self) -> None:
        o = self.options
        if not isinstance(o.ratio, (int, float)) or not 0 <= o.ratio < 1:
            raise UsageError(f"pass {NAME}: option ratio={o.ratio!r} must be in [0, 1)")
        if o.criterion not in CRITERIA:
            raise UsageError(f"pass {NAME}: option criterion={o.criterion!r} is not one of {', '.join(CRITERIA)}")
        if o.scope not in ("uniform", "global"):
            raise UsageError(f"pass {NAME}: option scope={o.scope!r} is not one of uniform, global")
        for key in ("round_to", "min_channels"):
            if not isinstance(getattr(o, key), int) or getattr(o, key) < 1:
                raise UsageError(f"pass {NAME}: option {key}={getattr(o, key)!r} must be an integer >= 1")
        self._exclude = compile_regex(NAME, "exclude", o.exclude)
        self._plan = read_plan(o.plan) if o.plan else None

    def contract_for_options(self) -> Literal["exact", "approximate"]:
        return "exact" if self.options.criterion == "zero" and not self.options.plan else "approximate"

    def claims_speedup(self, result: PassResult) -> bool:
        summary = result.report["summary"]
        return summary["channels_after"] < summary["channels_before"]

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        started = time.perf_counter()
        o = self.options
        folded_bn = batchnorm_scales(model) if o.criterion == "bn-scale" else {}
        analysis = analyze(prepare(model))
        scored = unit_scores(analysis, o.criterion, folded_bn)
        scores = {gid: s for gid, (s, _) in scored.items()}
        if self._plan is not None:
            decisions = decisions_from_plan(analysis, self._plan, o.plan, scores)
        else:
            excluded = self._excluded(analysis, ctx)
            targets = Targets(o.ratio, o.scope, o.round_to, o.min_channels, exact_only=o.criterion == "zero")
            decisions = choose(analysis, scores, targets, excluded)
        removed = removed_roots(decisions)
        counts = kept_counts(analysis, removed)
        params_before = count_params(model)
        if removed:
            new_model, notes = apply_removal(analysis, removed)
        else:
            new_model, notes = self._unchanged(model), {}
        details = self._report(analysis, decisions, scored, counts, notes)
        details["summary"].update(
            params_before=params_before,
            params_after=count_params(new_model),
            seconds=round(time.perf_counter() - started, 3),
        )
        if not any(d.group.prunable.any() for d in decisions):
            ctx.warn(details["message"])
        artifacts = ()
        if o.plan_out:
            plan = to_json(plan_payload(analysis, decisions, self._settings())) + "\n"
            artifacts = (Artifact(o.plan_out, "structured-sparse plan", plan.encode()),)
        return PassResult(new_model, details, artifacts)

    @staticmethod
    def _unchanged(model: onnx.ModelProto) -> onnx.ModelProto:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy

    def _settings(self) -> dict:
        o = self.options
        return {
            "ratio": o.ratio,
            "criterion": o.criterion,
            "scope": o.scope,
            "round_to": o.round_to,
            "min_channels": o.min_channels,
            "exclude": o.exclude,
        }

    def _excluded(self, analysis: Analysis, ctx: PassContext) -> dict[int, str]:
        if self._exclude is None:
            return {}
        excluded = {}
        for group in analysis.groups:
            hit = next((p for p in group.producers if self._exclude.search(p)), None)
            if hit is not None:
                excluded[group.id] = f"excluded by option exclude={self.options.exclude!r} (matches {hit})"
        if not excluded:
            example = analysis.groups[0].name if analysis.groups else "(no groups)"
            ctx.warn(
                f"pass {NAME}: option exclude={self.options.exclude!r} matches no group's producer node "
                f"(names look like {example!r})"
            )
        return excluded

    def _report(
        self, analysis: Analysis, decisions: list[Decision], scored: dict, counts: dict, notes: dict[str, list[str]]
    ) -> dict:
        groups = [self._group_report(d, scored[d.group.id][1], counts, notes) for d in decisions]
        before = sum(d.group.channels for d in decisions)
        after = sum(int(d.keep.sum()) for d in decisions)
        pruned = sum(d.status == STATUS_PRUNED for d in decisions)
        prunable = sum(bool(d.group.prunable.any()) for d in decisions)
        if not prunable:
            message = (
                f"no prunable channel group: {len(decisions)} groups, every one declined "
                "(see each group's reason); the model is unchanged"
            )
        elif not pruned:
            message = f"nothing removed: {prunable} of {len(decisions)} groups are prunable; the model is unchanged"
        else:
            message = f"removed {before - after} of {before} channels in {pruned} of {len(decisions)} groups"
        return {
            "criterion": self.options.criterion,
            "scope": self.options.scope,
            "plan": self.options.plan,
            "message": message,
            "summary": {
                "groups": len(decisions),
                "prunable_groups": prunable,
                "pruned_groups": pruned,
                "channels_before": before,
                "channels_after": after,
            },
            "groups": groups,
        }

    @staticmethod
    def _group_report(decision: Decision, note: str | None, counts: dict, notes: dict[str, list[str]]) -> dict:
        group = decision.group
        entry = {
            "id": group.id,
            "name": group.name,
            "producers": group.producers,
            "status": decision.status,
            "channels_before": group.channels,
            "channels_after": int(decision.keep.sum()),
            "importance": summary(decision.scores, decision.keep),
        }
        if decision.status == STATUS_PRUNED:
            entry["kept"] = decision.kept  # new channel i is old channel kept[i]
            entry["exact"] = bool(group.exact[~decision.keep].all())
        if decision.why:
            entry["reason"] = decision.why
        if note:
            entry["importance"]["note"] = note
        entry["members"] = [
            {
                "node": m.node,
                "tensor": m.tensor,
                "axis": m.axis,
                "role": m.role,
                "before": counts[m.tensor][0],
                "after": counts[m.tensor][1],
            }
            for m in group.members
        ]
        member_notes = sorted({text for m in group.members for text in notes.get(m.node, [])})
        if member_notes:
            entry["notes"] = member_notes
        return entry
