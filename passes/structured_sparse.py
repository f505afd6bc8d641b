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

import onnx

from optimizer.errors import UsageError
from optimizer.io_json import to_json
from optimizer.report import Shapes, model_stats
from passes import Artifact, Pass, PassContext, PassResult, option, register
from passes.base import compile_regex
from passes.cleanup import cleanup_model
from passes.graph.activations import sample_shapes
from passes.graph.budget import Budget, CostModel, allocate
from passes.graph.calibrated import DATA_CRITERIA, Phases, importance, remove_and_recover
from passes.graph.data_scores import capture
from passes.graph.edit import GraphEdit
from passes.graph.embedding_factor import FactoredTable, embedding_scores, factor_embeddings, merge_unsaved
from passes.graph.fidelity import fidelity_summary, weight_counts
from passes.graph.groups import Analysis, analyze
from passes.graph.importance import CRITERIA, summary
from passes.graph.ir import with_shapes
from passes.graph.output_gain import output_gains, scaled
from passes.graph.plan import decisions_from_plan, plan_payload, read_plan
from passes.graph.prune import kept_counts
from passes.graph.selection import (
    STATUS_PRUNED,
    Decision,
    Targets,
    choose,
    finish,
    initial,
    removed_roots,
    settle,
    step,
)

NAME = "structured-sparse"
LANDING = 0.02  # a budget is met when the kept fraction lands this close to it
SLOW_MACS = 0.95  # a weights cut keeping this much of the MACs (and removing twice as much of the weights) is slow
MAX_DROP_GRID = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
DEFAULT_DATA_CRITERION = "reconstruction"  # measured best with calibration data: see benchmarks/accuracy_recovery.py


def count_params(model: onnx.ModelProto) -> int:
    """Elements in floating-point weights: initializers and the tensors of Constant nodes (some exporters keep
    every weight in a Constant node)."""
    return weight_counts(model)[0]


def without_initializer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Older exporters list every weight as a graph input too (keep_initializers_as_inputs), which would make it
    overridable and so not a constant; such inputs are dropped, as onnxruntime's tools recommend."""
    weights = {t.name for t in model.graph.initializer}
    if not any(value.name in weights for value in model.graph.input):
        return model
    edit = GraphEdit(model)
    edit.graph.inputs = [tensor for tensor in edit.graph.inputs if tensor.name not in weights]
    return edit.to_model()


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


@dataclass
class Attempt:
    """One selection + removal + recovery: what the report is built from."""

    analysis: Analysis
    decisions: list[Decision]
    estimate: list[float] | None
    counts: dict
    model: onnx.ModelProto
    notes: dict
    recovery: object
    budget: list[tuple[str, float]] | None


@register
class StructuredSparse(Pass):
    name = NAME
    summary = "removes whole channels/filters/neurons and rewires every producer and consumer"
    contract = "approximate"

    @dataclass(frozen=True)
    class Options:
        ratio: float = option(0.5, "fraction of each group's channels to remove, 0 <= ratio < 1 (unused by zero "
                                   "and when keep_params/keep_macs is given)")
        criterion: Literal["auto", "activation", "reconstruction", "l1", "l2", "bn-scale", "hoyer", "zero"] = option(
            "auto",
            "importance: activation = ||W[:,c]||*||X_c|| over the consumers on the calibration data (Wanda), "
            "reconstruction = the consumers' output error when the channel goes and they are refitted (OBS), "
            "l1/l2 norm of producer rows, bn-scale |gamma|, hoyer (Group-HS normalized l2), or zero = remove only "
            "channels whose removal provably leaves the outputs unchanged (exact); auto = reconstruction with "
            "--calibration data, l1 without",
        )
        recover: Literal["auto", "none", "lsq", "mean"] = option(
            "auto",
            "after the removal, refit the layers reading pruned channels to the original outputs: lsq = ridge "
            "least squares of weights and bias, mean = bias only (folds the removed channels' mean), none; auto = "
            "lsq with --calibration data, none without",
        )
        keep_params: float | None = option(None, "keep this fraction of the model's weights (0 < F <= 1): per-group "
                                                 "cuts chosen globally by sensitivity")
        keep_macs: float | None = option(None, "keep this fraction of the model's MACs (0 < F <= 1); with keep_params "
                                               "both budgets are met")
        max_drop: float | None = option(None, "with --eval labels: the largest keep_params cut (tried from 0.9 down to "
                                              "0.2) whose top-1 drop is at most this many points")
        embeddings: Literal["factor", "count", "exclude"] = option(
            "factor", "embedding tables (a Gather's V x D data): factor = counted among the weights, and a budget "
                      "(keep_params/keep_macs/max_drop) may cut their rank (an SVD makes the table U*S -> MatMul "
                      "Vt and the weakest singular directions go; a rank that saves nothing is multiplied back; "
                      "ratio leaves tables whole), count = counted but left whole, exclude = left whole and not "
                      "counted by keep_params")
        ridge: float | None = option(None, "ridge of the least-squares recovery, relative to the mean input energy; "
                                           "auto (default): each layer picks one of 1e-5 ... 1e-1 by two-fold "
                                           "cross-validation on the calibration samples")
        recovery_stages: int = option(16, "at most this many sequential refit rounds (each runs the models once on "
                                         "the calibration data; layers beyond it are refitted in shared rounds)")
        scope: Literal["uniform", "global"] = option("uniform", "ratio per group, or one ranking across groups")
        round_to: int | None = option(None, "keep a multiple of this many channels in each group; auto (default): 8 "
                                            "in Conv groups of 32 or more channels whose width is a multiple of 8 "
                                            "(ONNX Runtime runs aligned widths much faster) unless that keeps a "
                                            "budget from landing within 2 points, 1 elsewhere and for zero")
        min_channels: int = option(1, "keep at least this many channels in each group")
        max_ratio: float = option(0.5, "with keep_params/keep_macs: remove at most this fraction of any group (a "
                                        "group cut deeper loses more than the per-unit estimates predict)")
        exclude: str | None = option(None, "regex on the names of the nodes producing a group: matches are kept")
        plan: str | None = option(None, "apply a plan saved with plan_out (a re-export of the same model)",
                                   file="read")
        plan_out: str | None = option(None, "write the plan (groups and kept channels) to this JSON file",
                                       file="write")

    def validate(self) -> None:
        o = self.options
        if not isinstance(o.ratio, (int, float)) or not 0 <= o.ratio < 1:
            raise UsageError(f"pass {NAME}: option ratio={o.ratio!r} must be in [0, 1)")
        if o.criterion not in ("auto", *CRITERIA, *DATA_CRITERIA):
            raise UsageError(f"pass {NAME}: option criterion={o.criterion!r} is not one of "
                             f"{', '.join((*DATA_CRITERIA, *CRITERIA))}")
        for key in ("keep_params", "keep_macs"):
            value = getattr(o, key)
            if value is not None and (not isinstance(value, (int, float)) or not 0 < value <= 1):
                raise UsageError(f"pass {NAME}: option {key}={value!r} must be a fraction in (0, 1] (e.g. 0.6 keeps "
                                 "60%)")
        if o.max_drop is not None:
            if not isinstance(o.max_drop, (int, float)) or not o.max_drop >= 0:
                raise UsageError(f"pass {NAME}: option max_drop={o.max_drop!r} must be a number of points >= 0")
            if o.keep_params is not None or o.keep_macs is not None:
                raise UsageError(f"pass {NAME}: max_drop chooses keep_params itself; drop keep_params/keep_macs")
        if (o.keep_params is not None or o.keep_macs is not None) and o.criterion == "zero":
            raise UsageError(f"pass {NAME}: criterion=zero removes only exact channels; it takes no keep_params/"
                             "keep_macs budget")
        if not isinstance(o.max_ratio, (int, float)) or not 0 < o.max_ratio <= 1:
            raise UsageError(f"pass {NAME}: option max_ratio={o.max_ratio!r} must be a fraction in (0, 1]")
        if o.ridge is not None and (not isinstance(o.ridge, (int, float)) or not o.ridge > 0):
            raise UsageError(f"pass {NAME}: option ridge={o.ridge!r} must be a positive number")
        if o.scope not in ("uniform", "global"):
            raise UsageError(f"pass {NAME}: option scope={o.scope!r} is not one of uniform, global")
        for key in ("round_to", "min_channels", "recovery_stages"):
            if key == "round_to" and o.round_to is None:
                continue
            if not isinstance(getattr(o, key), int) or getattr(o, key) < 1:
                raise UsageError(f"pass {NAME}: option {key}={getattr(o, key)!r} must be an integer >= 1")
        self._exclude = compile_regex(NAME, "exclude", o.exclude)
        self._plan = read_plan(o.plan) if o.plan else None

    def contract_for_options(self) -> Literal["exact", "approximate"]:
        o = self.options
        exact = o.criterion == "zero" and not o.plan and o.recover in ("auto", "none")
        return "exact" if exact else "approximate"

    def _resolve(self, ctx: PassContext) -> tuple[str, str, dict | None]:
        """(criterion, recover, calibration feeds or None) once the data is known."""
        o = self.options
        real = ctx.calibration is not None and not ctx.calibration_is_random
        feeds = ctx.calibration if real else None
        criterion = o.criterion if o.criterion != "auto" else (DEFAULT_DATA_CRITERION if real else "l1")
        if o.recover == "auto":
            recover = "lsq" if real and criterion != "zero" else "none"
        else:
            recover = o.recover
        for what, value in (("criterion", criterion if criterion in DATA_CRITERIA else None),
                            ("recover", recover if recover != "none" else None)):
            if value is not None and feeds is None:
                raise UsageError(f"pass {NAME}: option {what}={value} needs calibration data: pass --calibration "
                                 "FILE.npz with real inputs (or use criterion=l1, recover=none)")
        return criterion, recover, feeds

    def claims_speedup(self, result: PassResult) -> bool:
        summary = result.report["summary"]
        return summary["channels_after"] < summary["channels_before"]

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        started = time.perf_counter()
        o = self.options
        phases = Phases()
        criterion, recover_mode, feeds = self._resolve(ctx)
        with phases("analysis"):
            cleaned = prepare(model)
            budgeted = self._budget() is not None or o.max_drop is not None
            # a rank cut costs more accuracy than its share of the weights suggests: only a budget may spend it
            # (a plan is applied to the analysis it was made on)
            factor = o.embeddings == "factor" and (budgeted if self._plan is None else
                                                   bool(self._plan.get("settings", {}).get("factored_tables")))
            prepared, tables = factor_embeddings(cleaned) if factor else (cleaned, [])
            analysis = analyze(prepared)
            needs_grams = criterion == "reconstruction" or budgeted
            uses_data = criterion in DATA_CRITERIA or budgeted
            stats, grams, reference = capture(analysis, prepared, feeds, needs_grams) \
                if feeds is not None and uses_data else (None, [], None)
        with phases("selection"):
            scored, sens = importance(analysis, criterion, model, stats, grams, embedding_scores(analysis, tables))
            scores = {gid: s for gid, (s, _) in scored.items()}
            if budgeted and stats is not None and criterion in DATA_CRITERIA:
                sens = scaled(sens, output_gains(prepared, stats, scores, feeds))
        params_before = count_params(model)
        tried = None
        if o.max_drop is not None:
            attempt, tried = self._search_max_drop(prepared, scores, sens, ctx, model, feeds, recover_mode, phases,
                                                   tables, cleaned)
        else:
            attempt = self._attempt(analysis, scores, sens, ctx, model, feeds, recover_mode, phases, self._budget(),
                                    tables, cleaned)
        analysis, decisions, estimate, counts = attempt.analysis, attempt.decisions, attempt.estimate, attempt.counts
        new_model, notes, recovery = attempt.model, attempt.notes, attempt.recovery
        for text in recovery.warnings if recovery is not None else []:
            ctx.warn(f"pass {NAME}: {text}")
        details = self._report(analysis, decisions, scored, counts, notes)
        details.update(criterion=criterion, recover=recover_mode)
        if tried is not None:
            details["max_drop"] = {"points": o.max_drop, "tried": tried}
        details["summary"].update(
            params_before=params_before,
            params_after=count_params(new_model),
            seconds=round(time.perf_counter() - started, 3),
            phases=phases.rounded(),
        )
        details["summary"].update(fidelity_summary(model, prepared, new_model, feeds, ctx.evaluation, estimate,
                                                    attempt.budget, reference, o.embeddings != "exclude"))
        if recovery is not None:
            details["recovery"] = [layer.entry() for layer in recovery.layers]
        self._warn_if_not_faster(details["summary"], ctx)
        if not any(d.group.prunable.any() for d in decisions):
            ctx.warn(details["message"])
        artifacts = ()
        if o.plan_out:
            settings = {**self._settings(), "factored_tables": [t.table for t in tables]}
            plan = to_json(plan_payload(analysis, decisions, settings)) + "\n"
            artifacts = (Artifact(o.plan_out, "structured-sparse plan", plan.encode()),)
        return PassResult(new_model, details, artifacts)

    def _warn_if_not_faster(self, summary: dict, ctx: PassContext) -> None:
        """A weights budget met from layers that hold little compute (a CNN's last 1x1 layers and head) gives a
        smaller model that runs about as fast as before: say so, and how to ask for speed."""
        o = self.options
        macs, weights = summary.get("macs_kept"), summary.get("weights_kept")
        if o.keep_params is None or o.keep_macs is not None or macs is None or weights is None:
            return
        if macs >= SLOW_MACS and weights <= 1 - (1 - SLOW_MACS) * 2:
            ctx.warn(f"pass {NAME}: keep_params={o.keep_params} kept {weights:.3f} of the weights but {macs:.3f} of "
                     "the MACs, so the model will run about as fast as before; add keep_macs=F to cut compute too")

    def _attempt(self, analysis: Analysis, scores: dict, sens: dict, ctx: PassContext, model: onnx.ModelProto,
                 feeds, recover_mode: str, phases: Phases, wanted: list[tuple[str, float]] | None,
                 tables: list[FactoredTable], cleaned: onnx.ModelProto) -> Attempt:
        """Select (by ratio or the budget `wanted`), remove and recover on `analysis` (which it consumes);
        factored embedding `tables` (of `cleaned`, the model before factoring) that save nothing are merged."""
        with phases("selection"):
            decisions, estimate = self._decide(analysis, scores, sens, ctx, model, wanted)
        removed = removed_roots(decisions)
        counts = kept_counts(analysis, removed)
        if not removed:
            return Attempt(analysis, decisions, estimate, counts, self._unchanged(model), {}, None, wanted)
        with phases("recovery" if recover_mode != "none" else "removal"):
            pruned, notes, recovery = remove_and_recover(analysis, removed, feeds, recover_mode, self.options.ridge,
                                                         self.options.recovery_stages,
                                                         frozenset(t.basis for t in tables))
            pruned = merge_unsaved(pruned, tables, cleaned)
        return Attempt(analysis, decisions, estimate, counts, pruned, notes, recovery, wanted)

    def _search_max_drop(self, prepared, scores, sens, ctx, model, feeds, recover_mode, phases, tables, cleaned
                         ) -> tuple[Attempt, list[dict]]:
        """Bisect keep_params over MAX_DROP_GRID for the largest cut within max_drop points on --eval."""
        from passes.graph.fidelity import top1

        evaluation = ctx.evaluation
        if evaluation is None or "labels" not in evaluation:
            raise UsageError(f"pass {NAME}: option max_drop needs --eval data with labels")
        inputs = {k: v for k, v in evaluation.items() if k != "labels"}
        base = top1(model, inputs, evaluation["labels"])
        tried, results = [], {}

        def trial(index: int) -> bool:
            fraction = MAX_DROP_GRID[index]
            attempt = self._attempt(analyze(prepared), scores, sens, ctx, model, feeds, recover_mode, phases,
                                    [("params", fraction)], tables, cleaned)
            accuracy = top1(attempt.model, inputs, evaluation["labels"])
            drop = round(100 * (base - accuracy), 4)
            tried.append({"keep_params": fraction, "weights_kept": round(count_params(attempt.model) /
                                                                         max(count_params(model), 1), 4),
                          "top1": round(accuracy, 6), "drop_points": drop})
            results[index] = attempt
            return drop <= self.options.max_drop

        low, high, best = 0, len(MAX_DROP_GRID) - 1, None  # grid runs from the mildest cut to the deepest
        while low <= high:
            middle = (low + high) // 2
            if trial(middle):
                best, low = middle, middle + 1
            else:
                high = middle - 1
        if best is None:
            ctx.warn(f"pass {NAME}: even keep_params={MAX_DROP_GRID[0]} drops more than "
                     f"max_drop={self.options.max_drop} points; the mildest cut tried is written")
            best = 0 if 0 in results else min(results)
        return results[best], tried

    def _budget(self) -> list[tuple[str, float]] | None:
        o = self.options
        wanted = [(metric, float(value)) for metric, value in (("params", o.keep_params), ("macs", o.keep_macs))
                  if value is not None]
        return wanted or None

    def _decide(self, analysis: Analysis, scores: dict, sens: dict, ctx: PassContext, model: onnx.ModelProto,
                wanted: list[tuple[str, float]] | None) -> tuple[list[Decision], list[float] | None]:
        o = self.options
        measured = self._resolve(ctx)[0] in DATA_CRITERIA
        if self._plan is not None:
            return decisions_from_plan(analysis, self._plan, o.plan, scores), None
        excluded = self._excluded(analysis, ctx)
        exact = o.criterion == "zero"
        targets = Targets(o.ratio, o.scope, o.round_to, o.min_channels, exact_only=exact)
        if wanted is None:
            return choose(analysis, scores, targets, excluded), None
        shapes = sample_shapes(ctx.calibration)

        def count(m: onnx.ModelProto, metric: str) -> float:
            if metric == "macs":
                return float(model_stats(m, input_shapes=shapes)["macs"] or 0)
            total, tables = weight_counts(m)
            return float(total - tables if o.embeddings == "exclude" else total)

        prepared = analysis.view.source  # MACs of the input are counted once its Constant-node weights are folded
        budgets = []
        for metric, fraction in wanted:
            budget = Budget(metric, fraction, count(model if metric == "params" else prepared, metric),
                            count(prepared, metric))
            if not budget.total:
                what = "MACs" if metric == "macs" else "weights"
                raise UsageError(f"pass {NAME}: option keep_{metric}: the model's {what} cannot be counted (MACs "
                                 "need static shapes: give --calibration data or fixed spatial dims)")
            budgets.append(budget)
        cost = CostModel(analysis, embeddings=o.embeddings != "exclude", shapes=Shapes(prepared, 1, shapes))

        def allocated(aim: Targets) -> tuple[list[Decision], list[float]]:
            return allocate(analysis, initial(analysis, scores, excluded), sens, cost, budgets,
                            lambda ds: finish(analysis, ds, aim), o.min_channels, o.max_ratio,
                            {g.id: step(g, aim) for g in analysis.groups}, measured)

        def missed(reached: list[float]) -> bool:  # landed: none over, and the binding one within LANDING
            gaps = [r - b.fraction for r, b in zip(reached, budgets, strict=True)]
            return max(gaps) > LANDING or max(gaps) < -LANDING

        decisions, estimates = allocated(targets)
        if o.round_to is None and missed(estimates):
            # aligned widths are too coarse for this model to land the budget: free widths
            decisions, estimates = allocated(Targets(o.ratio, o.scope, 1, o.min_channels, exact_only=exact))
        return settle(decisions), estimates

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
