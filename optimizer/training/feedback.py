"""Feedback learning for robustness in the decision space (methods.md §7): find a classifier's weak boundary regions,
generate training examples there with the true labels, more for weaker classes, and retrain; plus the evaluation.

A RE-IMPLEMENTATION DESIGNED FROM THE ABSTRACT of Song, Wang, Li, "Feedback Learning for Improving the Robustness of
Neural Networks" (ICMLA 2019, arXiv 1909.05443). The abstract names the ingredients (distance-based criteria in the
decision space, a feedback loop that finds defects and retrains, per-class proportions of generated examples to
compensate inter-class inequality) but not the formulas; every concrete choice below is ours, and nothing here
reproduces the paper's numbers.

    search = BoundarySearch(norm="l2")
    result = feedback_learning(model, (x_train, y_train), FeedbackConfig(rounds=3, budget=400, search=search))
    report = robustness_report(result.model, x_test, y_test, eps=(0.05, 0.1), sigmas=(0.2,))
    print(format_table(report.per_class()))

The pieces and the choices they make:
  boundary_search     the minimal perturbation (L2 or Linf) that changes the decision of each sample away from its
                      TRUE label: DeepFool steps (linearise logit_k - logit_label for the `candidates` highest other
                      classes, step onto the nearest linearised boundary, 2% overshoot per step) inside the input
                      box [0, 1] (coordinates at a bound that a step would push out are frozen, and every iterate is
                      clipped), then a bisection on the segment from the sample to the last iterate for the crossing.
                      The result is a point on the wrong side of the decision boundary, so each distance is an upper
                      bound of the true minimum; on a linear classifier without clipping it is the exact distance
                      |w.x + b| / ||w||_2 (L2) or / ||w||_1 (Linf). A misclassified sample has distance 0; one whose
                      decision never changed within max_iter has distance inf.
  class_criteria      per class: mean (over finite distances) and median distance, and the fraction of samples whose
                      distance exceeds each radius eps (robust accuracy at eps; inf counts as robust).
  allocate            examples per class n_c proportional to w_c = max(d_c, floor) ** -compensation, d_c the class's
                      mean distance (weaker classes get more; compensation 0 is a uniform split), rounded by largest
                      remainder (ties to the lower class index) so that sum n_c == budget exactly.
  generate_examples   for class c the n_c samples nearest the boundary (cycling if n_c exceeds the class), each moved
                      a fraction f ~ U[fraction] of the way to its boundary point, labelled with the TRUE class: they
                      lie in the box and nearer the boundary than the sample they come from.
  feedback_learning   warmup epochs, then for each round: measure on a seeded probe subset of the training data,
                      allocate, generate, retrain on original + generated data (generated data accumulates across
                      rounds); one optimizer is stepped throughout, so its state carries across rounds.
  fgsm, pgd           Linf attacks on the cross-entropy (PGD: random start, step 2.5 eps / steps), clipped to [0, 1].
  robustness_report   per-sample correctness under clean, FGSM, PGD and Gaussian noise (non-adversarial), and the
                      boundary distances; `summary()` overall, `per_class()` rows, `format_table` prints them.
  adversarial_transform  a Trainer.fit(transform=) that replaces each batch by its PGD examples (the reference
                      adversarial training the samples compare against).
The model must read inputs in [0, 1] directly and return logits [N, classes]; it is put in eval mode while searched or
attacked (BatchNorm statistics stay fixed) and given back in the mode it had.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from optimizer.errors import UsageError
from optimizer.training.trainer import BatchTransform, TrainConfig, Trainer, build_optimizer, seed_everything

Norm = Literal["l2", "linf"]
Box = tuple[float, float] | None
UNIT_BOX: Box = (0.0, 1.0)


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[nn.Module]:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _clip(x: torch.Tensor, box: Box) -> torch.Tensor:
    return x if box is None else x.clamp(*box)


def _norms(r: torch.Tensor, norm: Norm) -> torch.Tensor:
    flat = r.flatten(1)
    return flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)


@torch.no_grad()
def _predict(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return model(inputs).argmax(1)


@dataclass(frozen=True)
class BoundarySearch:
    """How `boundary_search` looks for the nearest decision boundary (see the module docstring)."""

    norm: Norm = "l2"
    candidates: int = 3
    max_iter: int = 50
    overshoot: float = 0.02
    bisection_steps: int = 20
    box: Box = UNIT_BOX
    batch_size: int = 512

    def validate(self) -> None:
        if self.norm not in ("l2", "linf"):
            raise UsageError(f"BoundarySearch: norm={self.norm!r} must be 'l2' or 'linf'")
        if self.candidates < 1 or self.max_iter < 1 or self.overshoot < 0 or self.bisection_steps < 0:
            raise UsageError(f"BoundarySearch: candidates={self.candidates}, max_iter={self.max_iter}, overshoot="
                             f"{self.overshoot}, bisection_steps={self.bisection_steps} must be >= 1, >= 1, >= 0, >= 0")


@dataclass
class Boundary:
    """Per sample: the input, its true label, the boundary point found (on the wrong side) and the distance to it in
    `norm` (0 if misclassified, inf if none was found)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    points: torch.Tensor
    distances: torch.Tensor
    norm: Norm


@torch.enable_grad()
def _deepfool(model: nn.Module, x0: torch.Tensor, labels: torch.Tensor, search: BoundarySearch) -> torch.Tensor:
    """The last DeepFool iterate of each sample (x0 itself where misclassified or stuck)."""
    x = x0.clone()
    active = _predict(model, x0) == labels
    rows = torch.arange(len(x0))
    for _ in range(search.max_iter):
        index = rows[active]
        if len(index) == 0:
            break
        xa = x[index].requires_grad_()
        logits = model(xa)
        ya = labels[index]
        others = logits.detach().scatter(1, ya[:, None], -math.inf)
        picks = others.topk(min(search.candidates, logits.shape[1] - 1), dim=1).indices
        own = logits.gather(1, ya[:, None])
        gaps = logits.gather(1, picks) - own  # < 0 while the label still wins
        best_ratio = torch.full((len(index),), math.inf, dtype=x.dtype)
        best_step = torch.zeros_like(xa)
        for k in range(picks.shape[1]):
            (w,) = torch.autograd.grad(gaps[:, k].sum(), xa, retain_graph=k + 1 < picks.shape[1])
            if search.box is not None:
                blocked = ((xa <= search.box[0]) & (w < 0)) | ((xa >= search.box[1]) & (w > 0))
                w = w.masked_fill(blocked, 0.0)
            flat = w.flatten(1)
            dual = flat.norm(dim=1) if search.norm == "l2" else flat.abs().sum(dim=1)
            gap = gaps[:, k].detach().abs() + 1e-6
            ratio = torch.where(dual > 0, gap / dual, math.inf)
            shape = (-1, *[1] * (w.dim() - 1))
            # the step of length `ratio` (in the search norm) that raises the linearised gap the most
            direction = w / dual.clamp_min(1e-30).view(shape) if search.norm == "l2" else w.sign()
            step = ratio.view(shape) * direction
            better = ratio < best_ratio
            best_ratio = torch.where(better, ratio, best_ratio)
            best_step[better] = step[better]
        stuck = torch.isinf(best_ratio)
        moved = _clip(xa.detach() + (1 + search.overshoot) * best_step, search.box)
        x[index] = torch.where(stuck.view(-1, *[1] * (x.dim() - 1)), xa.detach(), moved)
        still = (_predict(model, x[index]) == ya) & ~stuck
        active[index] = still
    return x


@torch.no_grad()
def _bisect(model: nn.Module, x0: torch.Tensor, x1: torch.Tensor, labels: torch.Tensor, steps: int) -> torch.Tensor:
    """The fraction t of x0 -> x1 where the decision first leaves `labels`, from the wrong side (x1 must be wrong)."""
    low = torch.zeros(len(x0), dtype=x0.dtype)
    high = torch.ones(len(x0), dtype=x0.dtype)
    shape = (-1, *[1] * (x0.dim() - 1))
    for _ in range(steps):
        middle = (low + high) / 2
        wrong = _predict(model, x0 + middle.view(shape) * (x1 - x0)) != labels
        high = torch.where(wrong, middle, high)
        low = torch.where(wrong, low, middle)
    return high


def boundary_search(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                    search: BoundarySearch | None = None) -> Boundary:
    """The nearest decision boundary of every sample away from its true label (module docstring: boundary_search)."""
    search = search or BoundarySearch()
    search.validate()
    inputs, labels = torch.as_tensor(inputs), torch.as_tensor(labels)
    if len(inputs) != len(labels):
        raise UsageError(f"boundary_search: {len(inputs)} inputs but {len(labels)} labels")
    points, distances = [], []
    with _evaluating(model):
        for start in range(0, len(inputs), search.batch_size):
            x0, y = inputs[start:start + search.batch_size], labels[start:start + search.batch_size]
            last = _deepfool(model, x0, y, search)
            correct = _predict(model, x0) == y
            crossed = correct & (_predict(model, last) != y)
            t = _bisect(model, x0[crossed], last[crossed], y[crossed], search.bisection_steps)
            point = x0.clone()
            point[crossed] = x0[crossed] + t.view(-1, *[1] * (x0.dim() - 1)) * (last[crossed] - x0[crossed])
            distance = _norms(point - x0, search.norm)
            distance[correct & ~crossed] = math.inf
            points.append(point)
            distances.append(distance)
    return Boundary(inputs, labels, torch.cat(points), torch.cat(distances), search.norm)


@dataclass
class ClassCriteria:
    """Distance criteria of one class: samples, mean and median of the finite distances, samples with no boundary
    found (inf), and {eps: fraction of samples with distance > eps} (robust accuracy at eps)."""

    label: int
    count: int
    mean_distance: float
    median_distance: float
    unreached: int
    robust: dict[float, float] = field(default_factory=dict)


def class_criteria(boundary: Boundary, radii: Sequence[float] = (), classes: int | None = None) -> list[ClassCriteria]:
    """One ClassCriteria per class 0..classes-1 (default: the largest label + 1); a class without samples gets nan."""
    classes = classes if classes is not None else int(boundary.labels.max()) + 1
    rows = []
    for label in range(classes):
        d = boundary.distances[boundary.labels == label]
        finite = d[torch.isfinite(d)]
        rows.append(ClassCriteria(
            label, len(d), float(finite.mean()) if len(finite) else math.nan,
            float(finite.median()) if len(finite) else math.nan, int(torch.isinf(d).sum()),
            {eps: float((d > eps).float().mean()) if len(d) else math.nan for eps in radii}))
    return rows


def allocate(mean_distances: Sequence[float], budget: int, *, compensation: float = 1.0,
             floor: float = 1e-3) -> list[int]:
    """Examples per class: n_c = budget * w_c / sum(w), w_c = max(d_c, floor) ** -compensation (0 for a nan d_c),
    rounded by largest remainder, ties to the lower class index; sum(n_c) == budget.

    Example: d = (1, 2, 4), budget 10 -> w = (1, 0.5, 0.25), quotas (5.71, 2.86, 1.43) -> (6, 3, 1).
    """
    if budget < 0 or compensation < 0 or floor <= 0:
        raise UsageError(f"allocate: budget={budget}, compensation={compensation}, floor={floor} must be >= 0, >= 0 "
                         "and > 0")
    weights = [0.0 if math.isnan(d) else max(d, floor) ** -compensation for d in mean_distances]
    total = sum(weights)
    if total == 0:
        raise UsageError("allocate: no class has a measured distance (every mean distance is nan)")
    quotas = [budget * w / total for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda c: (-(quotas[c] - counts[c]), c))
    for c in by_remainder[:budget - sum(counts)]:
        counts[c] += 1
    return counts


@dataclass
class Generated:
    """Generated examples: inputs, their TRUE labels, the index of the sample each came from, and its fraction f."""

    inputs: torch.Tensor
    labels: torch.Tensor
    sources: torch.Tensor
    fractions: torch.Tensor


def generate_examples(boundary: Boundary, allocation: Sequence[int], *, fraction: tuple[float, float] = (0.5, 1.0),
                      seed: int = 0) -> Generated:
    """allocation[c] examples of class c, from its samples nearest the boundary first (cycling when there are fewer),
    each at x + f * (boundary point - x), f ~ U[fraction], labelled with the true class. Samples without a boundary
    found (inf) are not used."""
    low, high = fraction
    if not 0 <= low <= high <= 1:
        raise UsageError(f"generate_examples: fraction={fraction} must satisfy 0 <= low <= high <= 1")
    generator = torch.Generator().manual_seed(seed)
    chosen = [torch.zeros(0, dtype=torch.long)]
    for label, count in enumerate(allocation):
        if count == 0:
            continue
        pool = torch.nonzero((boundary.labels == label) & torch.isfinite(boundary.distances)).flatten()
        if len(pool) == 0:
            raise UsageError(f"generate_examples: {count} examples asked of class {label}, which has no sample with "
                             "a boundary found")
        pool = pool[boundary.distances[pool].argsort(stable=True)]
        chosen.append(pool[torch.arange(count) % len(pool)])
    sources = torch.cat(chosen)
    f = low + (high - low) * torch.rand(len(sources), generator=generator, dtype=boundary.inputs.dtype)
    x = boundary.inputs[sources]
    moved = x + f.view(-1, *[1] * (x.dim() - 1)) * (boundary.points[sources] - x)
    return Generated(moved, boundary.labels[sources], sources, f)


@dataclass(frozen=True)
class FeedbackConfig:
    """warmup_epochs of plain training, then `rounds` of (measure on `probe` training samples drawn afresh each round
    (None: all), generate `budget` examples, retrain round_epochs on original + all generated so far). `train` gives
    batch size, optimizer and lr for every phase (its epochs are ignored); one optimizer runs throughout."""

    rounds: int = 3
    warmup_epochs: int = 10
    round_epochs: int = 5
    budget: int = 400
    probe: int | None = 512
    search: BoundarySearch = BoundarySearch()
    fraction: tuple[float, float] = (0.5, 1.0)
    compensation: float = 1.0
    train: TrainConfig = TrainConfig(progress=False)
    seed: int = 0

    def validate(self) -> None:
        if self.rounds < 0 or self.warmup_epochs < 0 or self.round_epochs < 0 or self.budget < 0:
            raise UsageError(f"FeedbackConfig: rounds={self.rounds}, warmup_epochs={self.warmup_epochs}, round_epochs="
                             f"{self.round_epochs}, budget={self.budget} must be >= 0")
        if self.probe is not None and self.probe < 1:
            raise UsageError(f"FeedbackConfig: probe={self.probe} must be >= 1 or None (the whole training set)")
        self.search.validate()
        self.train.validate()


@dataclass
class FeedbackRound:
    """One round: the criteria measured on its probe, the examples allocated per class, and the retraining records."""

    round: int
    criteria: list[ClassCriteria]
    allocation: list[int]
    history: list[dict]


@dataclass
class FeedbackResult:
    model: nn.Module
    rounds: list[FeedbackRound]
    warmup: list[dict]


def feedback_learning(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor],
                      config: FeedbackConfig | None = None) -> FeedbackResult:
    """Train `model` in place by feedback learning (module docstring); returns it with the per-round records."""
    config = config or FeedbackConfig()
    config.validate()
    seed_everything(config.seed)
    inputs, labels = (torch.as_tensor(t) for t in train)
    classes = int(labels.max()) + 1
    trainer = Trainer(model, config.train)
    optimizer = build_optimizer(model, config.train)
    warmup = trainer.fit((inputs, labels), config=replace(config.train, epochs=config.warmup_epochs, seed=config.seed),
                         optimizer=optimizer)
    extra_x, extra_y = inputs[:0], labels[:0]
    rounds = []
    for r in range(config.rounds):
        draws = torch.Generator().manual_seed(config.seed * 1000 + r)
        probe = torch.randperm(len(inputs), generator=draws)[:config.probe or len(inputs)]
        boundary = boundary_search(model, inputs[probe], labels[probe], config.search)
        criteria = class_criteria(boundary, classes=classes)
        allocation = allocate([c.mean_distance for c in criteria], config.budget, compensation=config.compensation)
        generated = generate_examples(boundary, allocation, fraction=config.fraction, seed=config.seed * 1000 + r)
        extra_x, extra_y = torch.cat([extra_x, generated.inputs]), torch.cat([extra_y, generated.labels])
        history = trainer.fit((torch.cat([inputs, extra_x]), torch.cat([labels, extra_y])),
                              config=replace(config.train, epochs=config.round_epochs, seed=config.seed + r + 1),
                              optimizer=optimizer)
        rounds.append(FeedbackRound(r + 1, criteria, allocation, history))
    model.eval()
    return FeedbackResult(model, rounds, warmup)


@torch.enable_grad()
def _input_gradient(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_()
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), labels, reduction="sum"), x)
    return grad


def fgsm(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, eps: float, *, box: Box = UNIT_BOX,
         batch_size: int = 512) -> torch.Tensor:
    """x + eps * sign(d CE / dx), clipped to `box`."""
    out = []
    with _evaluating(model):
        for start in range(0, len(inputs), batch_size):
            x, y = inputs[start:start + batch_size], labels[start:start + batch_size]
            out.append(_clip(x + eps * _input_gradient(model, x, y).sign(), box).detach())
    return torch.cat(out) if out else inputs.clone()


def _pgd_batch(model, x, y, eps, steps, step_size, random_start, box, generator) -> torch.Tensor:
    adversarial = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1
        adversarial = _clip(x + eps * noise, box)
    for _ in range(steps):
        adversarial = adversarial + step_size * _input_gradient(model, adversarial, y).sign()
        adversarial = _clip(torch.min(torch.max(adversarial, x - eps), x + eps), box).detach()
    return adversarial


def pgd(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, eps: float, *, steps: int = 10,
        step_size: float | None = None, random_start: bool = True, box: Box = UNIT_BOX, seed: int = 0,
        batch_size: int = 512) -> torch.Tensor:
    """Linf PGD on the cross-entropy: `steps` signed-gradient steps of step_size (default 2.5 eps / steps), each
    projected onto the eps ball around the input and clipped to `box`; random_start draws the start in the ball."""
    step_size = step_size if step_size is not None else 2.5 * eps / max(steps, 1)
    generator = torch.Generator().manual_seed(seed)
    out = []
    with _evaluating(model):
        for start in range(0, len(inputs), batch_size):
            x, y = inputs[start:start + batch_size], labels[start:start + batch_size]
            out.append(_pgd_batch(model, x, y, eps, steps, step_size, random_start, box, generator))
    return torch.cat(out) if out else inputs.clone()


def adversarial_transform(model: nn.Module, eps: float, *, steps: int = 7, box: Box = UNIT_BOX,
                          seed: int = 0) -> BatchTransform:
    """A Trainer.fit(transform=) that trains on the PGD examples of each batch (Madry et al.'s adversarial training)."""
    generator = torch.Generator().manual_seed(seed)

    def attack(inputs: torch.Tensor, targets: torch.Tensor, _epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        with _evaluating(model):
            return _pgd_batch(model, inputs, targets, eps, steps, 2.5 * eps / steps, True, box, generator), targets

    return attack


@torch.no_grad()
def _correct(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    with _evaluating(model):
        return torch.cat([_predict(model, inputs[s:s + batch_size]) == labels[s:s + batch_size]
                          for s in range(0, len(inputs), batch_size)])


def noisy_correct(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, sigma: float, *, draws: int = 5,
                  box: Box = UNIT_BOX, seed: int = 0) -> torch.Tensor:
    """Per sample, the fraction of `draws` Gaussian-noise copies (std sigma, clipped to `box`) classified correctly."""
    generator = torch.Generator().manual_seed(seed)
    hits = torch.zeros(len(inputs), dtype=torch.float64)
    for _ in range(draws):
        noisy = _clip(inputs + sigma * torch.randn(inputs.shape, generator=generator, dtype=inputs.dtype), box)
        hits += _correct(model, noisy, labels).double()
    return hits / draws


@dataclass
class RobustnessReport:
    """Per-sample scores in [0, 1] by column ("clean", "fgsm 0.1", "pgd 0.1", "noise 0.2", ...), the labels, and the
    boundary distances (one Boundary per norm measured)."""

    labels: torch.Tensor
    columns: dict[str, torch.Tensor]
    boundaries: dict[str, Boundary]

    def summary(self) -> dict[str, float]:
        """Mean of every column, and per norm the mean finite distance ("l2 distance")."""
        row = {name: float(scores.double().mean()) for name, scores in self.columns.items()}
        for norm, boundary in self.boundaries.items():
            finite = boundary.distances[torch.isfinite(boundary.distances)]
            row[f"{norm} distance"] = float(finite.mean()) if len(finite) else math.nan
        return row

    def per_class(self) -> list[dict[str, float]]:
        """One row per class: its label and count, then the same quantities as `summary` over its samples."""
        rows = []
        for label in range(int(self.labels.max()) + 1):
            mask = self.labels == label
            row: dict[str, float] = {"class": label, "n": int(mask.sum())}
            row.update({name: float(scores[mask].double().mean()) for name, scores in self.columns.items()})
            for norm, boundary in self.boundaries.items():
                d = boundary.distances[mask]
                finite = d[torch.isfinite(d)]
                row[f"{norm} distance"] = float(finite.mean()) if len(finite) else math.nan
            rows.append(row)
        return rows


def robustness_report(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, eps: Sequence[float] = (0.1,),
                      sigmas: Sequence[float] = (0.2,), norms: Sequence[Norm] = ("l2",), pgd_steps: int = 10,
                      search: BoundarySearch | None = None, seed: int = 0) -> RobustnessReport:
    """Clean, FGSM and PGD (each eps), Gaussian-noise (each sigma) correctness and the boundary distances (each norm)
    of `model` on (inputs, labels)."""
    search = search or BoundarySearch()
    columns = {"clean": _correct(model, inputs, labels)}
    for e in eps:
        columns[f"fgsm {e:g}"] = _correct(model, fgsm(model, inputs, labels, e, box=search.box), labels)
    for e in eps:
        attacked = pgd(model, inputs, labels, e, steps=pgd_steps, box=search.box, seed=seed)
        columns[f"pgd {e:g}"] = _correct(model, attacked, labels)
    for sigma in sigmas:
        columns[f"noise {sigma:g}"] = noisy_correct(model, inputs, labels, sigma, box=search.box, seed=seed)
    boundaries = {norm: boundary_search(model, inputs, labels, replace(search, norm=norm)) for norm in norms}
    return RobustnessReport(labels, columns, boundaries)


def format_table(rows: Sequence[dict[str, float]], *, first: str = "class") -> str:
    """A fixed-width table of rows sharing keys: scores in [0, 1] as percentages, distances with 3 decimals."""
    if not rows:
        return ""
    keys = list(rows[0])
    widths = {k: max(len(k), 7) + 2 for k in keys}
    widths[first] = max(len(first), *(len(str(r[first])) for r in rows)) + 1

    def cell(key: str, value) -> str:
        if key == first or isinstance(value, int):
            return f"{value!s:>{widths[key]}}" if key != first else f"{value!s:<{widths[key]}}"
        if key.endswith("distance"):
            return f"{value:>{widths[key]}.3f}"
        return f"{100 * value:>{widths[key] - 1}.1f}%"

    header = "".join(f"{k:<{widths[k]}}" if k == first else f"{k:>{widths[k]}}" for k in keys)
    return "\n".join([header, *("".join(cell(k, r[k]) for k in keys) for r in rows)])
