"""AutoGrow (Wen et al., KDD 2020): grow a network's depth one block at a time while training, and stop by itself.

    train, validation = hold_out(x_train, y_train, fraction=0.15, seed=0)
    result = auto_grow(train, validation, GrowConfig(seed_arch=(1, 1, 1), widths=(8, 16, 32), in_channels=1))
    result.arch, result.records, result.model

The network family is `GrowingNet`: a stem conv, S stages of sub-modules, global average pooling and a linear
classifier. A sub-module is a residual BasicBlock, or one Conv-BN-ReLU for plain=True; the first block of every stage
but the first halves the resolution (stride 2, projection shortcut). `arch` counts the blocks per stage. Parameter
names are "stages.<stage>.<block>.*", so a block appended at the end of a stage takes new names and every existing
parameter keeps its own: growing is "build the deeper net, load the old state by name" (`grow`), and the
optimizer's per-parameter state (momentum) moves across by the same names.

A new block keeps PyTorch's default initialisation except its last BatchNorm, which the initializer sets: gaussian
(gamma, beta ~ N(0, init_meta), the paper's default), uniform (U(0, init_meta)) or zero (gamma = beta = 0). With
zero a residual block adds nothing to its input, and since that input is the previous block's ReLU output
(non-negative) the ReLU after the add passes it unchanged: the grown net computes the same function (a network
morphism). A zero-initialised *plain* block outputs ReLU(0) = 0 instead; there the morphism does not hold.

`GrowthPolicy` decides, from validation accuracies alone, which stage grows and when a stage stops:
  periodic    every grow_interval epochs the next stage that can still grow (round-robin) gets one block. The
              running maximum of validation accuracy is taken after every interval; when it rose by less than
              threshold percentage points over the last stop_interval intervals, the stage grown last is frozen.
              Like the official code, the window is not reset after a freeze, so once accuracy has stalled the
              stages usually freeze one after another in the following intervals.
  convergent  a stage grows only when the running maximum gained less than threshold over the last
              grow_interval epochs (the current net has converged); the stage grown last is frozen when, by then,
              the running maximum had not risen by threshold since that growth.
Growth ends when no stage can grow (frozen, or at max_arch) or after max_epochs; then the final net trains
tail_epochs more with a cosine-decaying lr. The lr is constant while growing, as the paper recommends.

The official code grows and stops on *test* accuracy; here validation is always data held out of the training set
(`hold_out`), and the test split is never seen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from optimizer.errors import ModelError, UsageError
from optimizer.training.trainer import Data, TrainConfig, Trainer, seed_everything

Initializer = Literal["gaussian", "uniform", "zero"]
INITIALIZERS = ("gaussian", "uniform", "zero")


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut (identity, or 1x1 conv-BN when the shape changes), then ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels))

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PlainBlock(nn.Module):
    """One conv3x3-BN-ReLU: the sub-module of AutoGrow's plain nets (no shortcut)."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class GrowingNet(nn.Module):
    """Stem conv-BN-ReLU, len(arch) stages of arch[s] blocks of widths[s] channels, global pooling, linear."""

    def __init__(self, arch: Sequence[int], widths: Sequence[int] = (16, 32, 64), *, in_channels: int = 3,
                 num_classes: int = 10, plain: bool = False):
        super().__init__()
        if len(arch) != len(widths) or not arch or any(int(n) < 1 for n in arch) or any(w < 1 for w in widths):
            raise UsageError(f"GrowingNet: arch={list(arch)} needs one block count >= 1 per stage of "
                             f"widths={list(widths)}")
        self.arch = tuple(int(n) for n in arch)
        self.widths = tuple(int(w) for w in widths)
        self.in_channels, self.num_classes, self.plain = in_channels, num_classes, plain
        block = PlainBlock if plain else BasicBlock
        self.stem = nn.Sequential(nn.Conv2d(in_channels, self.widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(self.widths[0]), nn.ReLU())
        stages = []
        previous = self.widths[0]
        for stage, (count, width) in enumerate(zip(self.arch, self.widths, strict=True)):
            first_stride = 1 if stage == 0 else 2
            stages.append(nn.Sequential(*(block(previous if i == 0 else width, width, first_stride if i == 0 else 1)
                                          for i in range(count))))
            previous = width
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(previous, num_classes)

    def with_arch(self, arch: Sequence[int]) -> GrowingNet:
        """A freshly initialised net of the same family (widths, channels, classes, plain) with another arch."""
        return GrowingNet(arch, self.widths, in_channels=self.in_channels, num_classes=self.num_classes,
                          plain=self.plain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.classifier(torch.flatten(self.pool(x), 1))


def load_by_name(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy a smaller net's state into `model` by name; returns the names of `model` that `state` did not hold.

    Every name in `state` must exist in `model` with the same shape (a grown net only adds names)."""
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ModelError(f"load_by_name: {len(unknown)} entries of the old state are not in the new model, "
                         f"e.g. {unknown[0]!r}")
    for name, value in state.items():
        if own[name].shape != value.shape:
            raise ModelError(f"load_by_name: {name!r} has shape {tuple(value.shape)} in the old state but "
                             f"{tuple(own[name].shape)} in the new model")
    model.load_state_dict(state, strict=False)
    return sorted(set(own) - set(state))


def initialize_block(block: nn.Module, initializer: Initializer = "gaussian", init_meta: float = 1.0) -> None:
    """Set a new block's last BatchNorm: gamma, beta ~ N(0, init_meta) | U(0, init_meta) | both 0."""
    bn = block.last_bn
    with torch.no_grad():
        if initializer == "gaussian":
            bn.weight.normal_(0.0, init_meta)
            bn.bias.normal_(0.0, init_meta)
        elif initializer == "uniform":
            bn.weight.uniform_(0.0, init_meta)
            bn.bias.uniform_(0.0, init_meta)
        elif initializer == "zero":
            bn.weight.zero_()
            bn.bias.zero_()
        else:
            raise UsageError(f"initializer={initializer!r}: use one of {', '.join(INITIALIZERS)}")


def grow(
    model: GrowingNet,
    stage: int,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    initializer: Initializer = "gaussian",
    init_meta: float = 1.0,
) -> tuple[GrowingNet, torch.optim.Optimizer | None]:
    """Append one block at the end of `stage`: (the grown net, an optimizer over it carrying the old state).

    The grown net holds every parameter and buffer of `model` under the same name; the new block has default init
    but for its last BatchNorm (`initialize_block`). The optimizer is a new one of the same type and
    hyperparameters whose per-parameter state (momentum buffers, Adam moments) is a copy of the old one's,
    matched by parameter name; the new block's parameters start without state.
    """
    if not 0 <= stage < len(model.arch):
        raise UsageError(f"grow: stage={stage} is not one of the net's {len(model.arch)} stages")
    arch = list(model.arch)
    arch[stage] += 1
    grown = model.with_arch(arch).to(next(model.parameters()).device)
    load_by_name(grown, model.state_dict())
    initialize_block(grown.stages[stage][-1], initializer, init_meta)
    grown.train(model.training)
    return grown, None if optimizer is None else carry_optimizer(optimizer, model, grown)


def carry_optimizer(optimizer: torch.optim.Optimizer, old: nn.Module, new: nn.Module) -> torch.optim.Optimizer:
    """A new optimizer of the same type and hyperparameters over new's parameters, with old's state by name."""
    if len(optimizer.param_groups) != 1:
        raise UsageError(f"carry_optimizer: the optimizer has {len(optimizer.param_groups)} parameter groups; "
                         "AutoGrow carries one group over all parameters")
    hyper = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    carried = type(optimizer)(new.parameters(), **{k: v for k, v in hyper.items() if k in optimizer.defaults})
    carried.param_groups[0].update(hyper)
    new_params = dict(new.named_parameters())
    for name, param in old.named_parameters():
        state = optimizer.state.get(param)
        if state:
            carried.state[new_params[name]] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
    return carried


class GrowthPolicy:
    """Which stage grows and which stage stops, from validation accuracies only (no model here).

    Call `update(accuracies)` once per step, with the validation accuracies (fractions) of the step's epochs: a
    step is grow_interval epochs for the periodic policy and one epoch for the convergent one. `arch` and
    `max_arch` change in place; `done` says that no stage can grow any more.
    """

    def __init__(self, arch: Sequence[int], max_arch: Sequence[int], *,
                 policy: Literal["periodic", "convergent"] = "periodic", grow_interval: int = 1,
                 stop_interval: int = 10, threshold: float = 0.05):
        if len(max_arch) != len(arch) or any(m < a for a, m in zip(arch, max_arch, strict=True)):
            raise UsageError(f"max_arch={list(max_arch)} needs one entry >= the seed's per stage of arch={list(arch)}")
        if policy not in ("periodic", "convergent") or grow_interval < 1 or stop_interval < 1 or threshold < 0:
            raise UsageError(f"policy={policy!r} (periodic|convergent), grow_interval={grow_interval} (>= 1), "
                             f"stop_interval={stop_interval} (>= 1), threshold={threshold} (>= 0 points)")
        self.arch, self.max_arch = list(arch), list(max_arch)
        self.policy, self.grow_interval, self.stop_interval, self.threshold = (policy, grow_interval, stop_interval,
                                                                               threshold)
        self.best: list[float] = []  # running maximum of validation accuracy in points, one entry per step
        self.frozen: list[int] = []  # stages the stopping rule froze, in order
        self.grown: int | None = None
        self.next_stage = 0
        self.grown_at = 0  # len(best) when the last growth happened

    @property
    def step_epochs(self) -> int:
        return self.grow_interval if self.policy == "periodic" else 1

    @property
    def done(self) -> bool:
        return self._growable_from(self.next_stage) is None

    def update(self, accuracies: Sequence[float], *, may_grow: bool = True) -> tuple[int | None, int | None]:
        """Record one step's accuracies; returns (stage frozen now, stage grown now), None for none."""
        if not accuracies:
            raise UsageError("GrowthPolicy.update: a step needs at least one validation accuracy")
        previous = self.best[-1] if self.best else float("-inf")
        self.best.append(max(previous, 100.0 * max(accuracies)))
        if self.policy == "periodic":
            stalled = self._gain(self.stop_interval) < self.threshold
            ready = True
        else:
            settled = len(self.best) - self.grown_at >= self.grow_interval
            ready = settled and self._gain(self.grow_interval) < self.threshold
            stalled = ready and self.best[-1] - self._best_before_growth() < self.threshold
        froze = self._freeze_grown() if stalled else None
        grew = self._grow() if ready and may_grow else None
        return froze, grew

    def _gain(self, steps: int) -> float:
        """How much the running maximum rose over the last `steps` steps (infinite until that many exist)."""
        return self.best[-1] - self.best[-1 - steps] if len(self.best) > steps else float("inf")

    def _best_before_growth(self) -> float:
        return self.best[self.grown_at - 1] if self.grown_at else float("-inf")

    def _freeze_grown(self) -> int | None:
        stage = self.grown
        if stage is None or self.max_arch[stage] == self.arch[stage]:
            return None
        self.max_arch[stage] = self.arch[stage]
        self.frozen.append(stage)
        return stage

    def _grow(self) -> int | None:
        stage = self._growable_from(self.next_stage)
        if stage is None:
            return None
        self.arch[stage] += 1
        self.grown, self.grown_at = stage, len(self.best)
        self.next_stage = (stage + 1) % len(self.arch)
        return stage

    def _growable_from(self, start: int) -> int | None:
        count = len(self.arch)
        return next((s % count for s in range(start, start + count) if self.arch[s % count] < self.max_arch[s % count]),
                    None)


@dataclass(frozen=True)
class GrowConfig:
    """The net (seed_arch, widths, in_channels, num_classes, plain), the policy (see GrowthPolicy; threshold in
    percentage points), the new block's initializer, the budgets (max_arch, max_epochs of growth, tail_epochs) and
    SGD (lr constant while growing, cosine over the tail). max_arch None means 1000 blocks per stage."""

    seed_arch: tuple[int, ...] = (1, 1, 1)
    widths: tuple[int, ...] = (16, 32, 64)
    in_channels: int = 3
    num_classes: int = 10
    plain: bool = False
    policy: Literal["periodic", "convergent"] = "periodic"
    grow_interval: int = 1
    stop_interval: int = 10
    threshold: float = 0.05
    initializer: Initializer = "gaussian"
    init_meta: float = 1.0
    max_arch: tuple[int, ...] | None = None
    max_epochs: int = 100
    tail_epochs: int = 20
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    seed: int = 0
    progress: bool = False

    def validate(self) -> None:
        if self.initializer not in INITIALIZERS:
            raise UsageError(f"GrowConfig: initializer={self.initializer!r}: use one of {', '.join(INITIALIZERS)}")
        if self.max_epochs < 1 or self.tail_epochs < 0:
            raise UsageError(f"GrowConfig: max_epochs={self.max_epochs} must be >= 1, "
                             f"tail_epochs={self.tail_epochs} >= 0")

    def train_config(self, epochs: int, seed: int, schedule: Literal["constant", "cosine"]) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, optimizer="sgd", lr=self.lr,
                           momentum=self.momentum, weight_decay=self.weight_decay, schedule=schedule, seed=seed,
                           progress=self.progress)


@dataclass(frozen=True)
class GrowthRecord:
    """One step of growth: the arch trained during it, the epochs so far, the step's last validation accuracy and
    the running maximum (fractions), and the stage the policy froze / grew at its end (None: none)."""

    step: int
    epoch: int
    arch: tuple[int, ...]
    val_accuracy: float
    best_accuracy: float
    froze: int | None
    grew: int | None


@dataclass
class GrowthResult:
    model: GrowingNet
    arch: tuple[int, ...]
    records: list[GrowthRecord]
    growth_epochs: int
    stopped_by: Literal["policy", "budget"]
    frozen: list[int]
    tail: list[dict] = field(default_factory=list)


def auto_grow(
    train: Data,
    validation: Data,
    config: GrowConfig | None = None,
    *,
    on_record: Callable[[GrowthRecord], None] | None = None,
) -> GrowthResult:
    """Grow from config.seed_arch while training on `train`, deciding on `validation` accuracy; then the tail."""
    config = config or GrowConfig()
    config.validate()
    max_arch = config.max_arch or tuple(1000 for _ in config.seed_arch)
    policy = GrowthPolicy(config.seed_arch, max_arch, policy=config.policy, grow_interval=config.grow_interval,
                          stop_interval=config.stop_interval, threshold=config.threshold)
    seed_everything(config.seed)
    model = GrowingNet(config.seed_arch, config.widths, in_channels=config.in_channels,
                       num_classes=config.num_classes, plain=config.plain)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    records: list[GrowthRecord] = []
    epochs = 0
    while not policy.done and epochs < config.max_epochs:
        step_epochs = min(policy.step_epochs, config.max_epochs - epochs)
        trainer = Trainer(model, config.train_config(step_epochs, config.seed + epochs, "constant"))
        # the one optimizer is stepped throughout, so momentum survives fit calls and growth steps
        accuracies = [r["eval_accuracy"] for r in trainer.fit(train, validation, optimizer=optimizer)]
        epochs += step_epochs
        trained_arch = model.arch
        froze, grew = policy.update(accuracies, may_grow=epochs < config.max_epochs)
        if grew is not None:
            model, optimizer = grow(model, grew, optimizer, initializer=config.initializer,
                                    init_meta=config.init_meta)
        records.append(GrowthRecord(len(records) + 1, epochs, trained_arch, accuracies[-1], policy.best[-1] / 100.0,
                                    froze, grew))
        if on_record is not None:
            on_record(records[-1])
    result = GrowthResult(model, model.arch, records, epochs, "policy" if policy.done else "budget",
                          list(policy.frozen))
    if config.tail_epochs:
        tail = Trainer(model, config.train_config(config.tail_epochs, config.seed + epochs, "cosine"))
        result.tail = tail.fit(train, validation, optimizer=optimizer)
    return result


def train_fixed(arch: Sequence[int], train: Data, config: GrowConfig, constant_epochs: int) -> GrowingNet:
    """Train one architecture from scratch with AutoGrow's schedule (constant_epochs at constant lr, then the
    cosine tail): the baseline a grown net is compared against."""
    config.validate()
    seed_everything(config.seed)
    model = GrowingNet(arch, config.widths, in_channels=config.in_channels, num_classes=config.num_classes,
                       plain=config.plain)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    if constant_epochs:
        Trainer(model, config.train_config(constant_epochs, config.seed, "constant")).fit(train, optimizer=optimizer)
    if config.tail_epochs:
        Trainer(model, config.train_config(config.tail_epochs, config.seed + constant_epochs, "cosine")).fit(
            train, optimizer=optimizer)
    return model


def hold_out(inputs, targets, fraction: float = 0.15, seed: int = 0) -> tuple[tuple, tuple]:
    """Split training data into (train, validation) pairs of tensors by a seeded permutation."""
    inputs, targets = torch.as_tensor(inputs), torch.as_tensor(targets)
    if not 0 < fraction < 1 or len(inputs) != len(targets):
        raise UsageError(f"hold_out: fraction={fraction} must be in (0, 1), inputs and targets of equal length")
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    count = max(1, round(fraction * len(inputs)))
    val, tr = order[:count], order[count:]
    return (inputs[tr], targets[tr]), (inputs[val], targets[val])

