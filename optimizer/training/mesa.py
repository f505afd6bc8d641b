"""MESA (Qiao, Yang, Li, NeurIPS 2019; methods.md §2): model a backdoor's trigger *distribution* and retrain it away.

    search = SearchConfig(trigger_size=3, channels=1, epochs=100)
    generators = search_triggers(backdoored, defender_images, target=0, betas=(0.9, 0.8, 0.5), config=search)
    retrain_with_triggers(backdoored, (defender_images, defender_labels), ensemble_sampler(generators),
                          poison_ratio=0.2, config=TrainConfig(epochs=30, batch_size=32, optimizer="sgd", lr=1e-3))
    attack_success_rate(backdoored, eval_images, eval_labels, original_trigger, target=0)

Pieces, in the order the method uses them:
  stamp_trigger          paste a k x k trigger (C channels) into images at given locations.
  poison_batch           stamp a random fraction of a batch, which gets the target label (the attack) or keeps its
                         true labels (the defense). Like the official code, a batch shares one random location;
                         `attack_success_rate` draws one per image instead, so that a small evaluation set is not
                         scored at a single position.
  Mine                   the MINE estimate of I(a; b): Donsker-Varadhan bound mean T(a, b) - log mean exp T(a', b)
                         over joint pairs and pairs with an independent a', trained with the bias-corrected gradient
                         (moving average of mean exp T at rate 0.001).
  TriggerGenerator       G: z ~ U[0, 1)^64 -> a trigger in [0, 1]; z is cut into chunks fed as skip inputs.
  search_trigger         trains one G for one beta without trigger samples: loss_G = -mean(min(p_target, beta)) -
                         alpha * MI(z; G(z)), Gaussian noise (std 0.1) added to the trigger before stamping; the
                         attained mean target probability is what `detect_target` compares across classes.
  retrain_with_triggers  fine-tunes the backdoored model on the defender's clean data with a poison fraction of each
                         batch stamped by sampled triggers, true labels kept; the ensemble cycles the betas by epoch.
  backdoor_attack        the same loop with the target label: the attack the samples and tests defend against.
  reverse_trigger        the "point" baseline: one trigger reversed by gradient descent in pixel space.

The model is taken to read images in the trigger's space ([0, 1] pixels); wrap a model that normalizes its input
(the CIFAR code normalizes the pasted trigger) so that it does so itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from optimizer.errors import UsageError
from optimizer.training.trainer import TrainConfig, Trainer, seed_everything

TriggerSource = Callable[[int, int], torch.Tensor]
"""(count, epoch) -> count triggers [count, C, k, k]: a fixed trigger, a generator, or the ensemble of generators."""


def _check_trigger(images: torch.Tensor, trigger: torch.Tensor) -> None:
    if images.dim() != 4 or trigger.dim() not in (3, 4):
        raise UsageError(f"stamp_trigger: images must be [N, C, H, W] and the trigger [C, k, k] or [N, C, k, k], got "
                         f"{list(images.shape)} and {list(trigger.shape)}")
    channels, height, width = trigger.shape[-3:]
    if channels != images.shape[1] or height != width or height > min(images.shape[2:]):
        raise UsageError(f"stamp_trigger: a trigger of shape {list(trigger.shape[-3:])} does not fit images of shape "
                         f"{list(images.shape[1:])} (same channels, square, at most the image size)")


def random_locations(count: int, image_size: tuple[int, int], trigger_size: int, *, per_image: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """[count, 2] top-left corners (row, col) that keep a trigger inside the image: one shared by all (the code's
    batch-level location) or one per image."""
    rows, cols = image_size[0] - trigger_size + 1, image_size[1] - trigger_size + 1
    draws = count if per_image else 1
    corners = torch.stack([torch.randint(rows, (draws,), generator=generator),
                           torch.randint(cols, (draws,), generator=generator)], dim=1)
    return corners.expand(count, 2)


def stamp_trigger(images: torch.Tensor, trigger: torch.Tensor,
                  locations: torch.Tensor | tuple[int, int]) -> torch.Tensor:
    """A copy of images [N, C, H, W] with the trigger pasted over the k x k window at each location.

    trigger: [C, k, k] for all images or [N, C, k, k] one each; locations: (row, col) for all or [N, 2]. The result
    is differentiable in the trigger (the generator trains through it).
    """
    _check_trigger(images, trigger)
    count, size = len(images), trigger.shape[-1]
    corners = torch.as_tensor(locations, dtype=torch.long).reshape(-1, 2).expand(count, 2)
    if bool(((corners < 0) | (corners > torch.tensor(images.shape[2:]) - size)).any()):
        raise UsageError(f"stamp_trigger: a {size}x{size} trigger at {corners.unique(dim=0).tolist()} leaves the "
                         f"{images.shape[2]}x{images.shape[3]} image")
    offsets = torch.arange(size)
    rows = (corners[:, 0, None] + offsets)[:, :, None]
    cols = (corners[:, 1, None] + offsets)[:, None, :]
    patches = trigger.expand(count, *trigger.shape[-3:]).permute(0, 2, 3, 1).to(images.dtype)
    channels_last = images.permute(0, 2, 3, 1).index_put((torch.arange(count)[:, None, None], rows, cols), patches)
    return channels_last.permute(0, 3, 1, 2).contiguous()


def poison_batch(images: torch.Tensor, labels: torch.Tensor, triggers: TriggerSource, fraction: float, *,
                 target: int | None = None, epoch: int = 0,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stamp each image with probability `fraction` (one random location for the batch, as the official code does);
    the stamped images take the `target` label (the attack) or keep their own (target=None: the defense)."""
    chosen = torch.rand(len(images), generator=generator) < fraction
    count = int(chosen.sum())
    if count == 0:
        return images, labels
    with torch.no_grad():
        trigger = triggers(count, epoch)
    corner = random_locations(1, images.shape[2:], trigger.shape[-1], generator=generator)
    images = images.clone()
    images[chosen] = stamp_trigger(images[chosen], trigger, corner)
    if target is not None:
        labels = labels.clone()
        labels[chosen] = target
    return images, labels


def fixed_trigger(trigger: torch.Tensor) -> TriggerSource:
    """A TriggerSource that always yields the same trigger [C, k, k]."""
    return lambda count, _epoch: trigger.expand(count, *trigger.shape)


@torch.no_grad()
def attack_success_rate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, trigger: torch.Tensor,
                        target: int, *, seed: int = 0, batch_size: int = 512) -> float:
    """Fraction of the images not of the target class that the model calls `target` once stamped with the trigger,
    each at its own random location (seeded)."""
    keep = labels != target
    images = images[keep]
    if len(images) == 0:
        raise UsageError(f"attack_success_rate: every image is of the target class {target}")
    generator = torch.Generator().manual_seed(seed)
    corners = random_locations(len(images), images.shape[2:], trigger.shape[-1], per_image=True, generator=generator)
    was_training = model.training
    model.eval()
    hits = 0
    for start in range(0, len(images), batch_size):
        batch = stamp_trigger(images[start:start + batch_size], trigger, corners[start:start + batch_size])
        hits += int((model(batch).argmax(1) == target).sum())
    model.train(was_training)
    return hits / len(images)


class StatisticsNetwork(nn.Module):
    """T(a, b) = LReLU(fc3(LReLU(fc2(LReLU(W_a a + W_b b + bias))))), the official code's statistics network."""

    def __init__(self, a_features: int, b_features: int, hidden: int = 512):
        super().__init__()
        self.fc_a = nn.Linear(a_features, hidden)
        self.fc_b = nn.Linear(b_features, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        hidden = F.leaky_relu(self.fc_a(a.flatten(1)) + self.fc_b(b.flatten(1)), 0.2)
        return F.leaky_relu(self.fc3(F.leaky_relu(self.fc2(hidden), 0.2)), 0.2).squeeze(1)


class Mine:
    """MINE (Belghazi et al. 2018) estimate of I(a; b) with its own statistics network and Adam optimizer.

    `lower_bound(a, b, a_marginal)` is the Donsker-Varadhan bound mean T(a, b) - log(mean exp T(a', b) + 1e-8),
    a' drawn independently of b (fresh noise, or a shuffled a); it is differentiable in b, which is how the trigger
    generator maximises it. `step` trains T on one batch with the bias-corrected gradient: the denominator of the
    log term's gradient is a moving average of mean exp T (rate `rate`), started at the first batch's value.
    """

    def __init__(self, a_features: int, b_features: int, *, hidden: int = 512, lr: float = 2e-4,
                 betas: tuple[float, float] = (0.5, 0.999), rate: float = 1e-3):
        self.network = StatisticsNetwork(a_features, b_features, hidden)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=lr, betas=betas)
        self.rate = rate
        self.moving_average: torch.Tensor | None = None

    def lower_bound(self, a: torch.Tensor, b: torch.Tensor, a_marginal: torch.Tensor) -> torch.Tensor:
        joint, marginal = self.network(a, b), self.network(a_marginal, b)
        return joint.mean() - torch.log(torch.exp(marginal).mean() + 1e-8)

    def step(self, a: torch.Tensor, b: torch.Tensor, a_marginal: torch.Tensor) -> float:
        """One training step of T on detached inputs; returns the bound before the step."""
        a, b, a_marginal = a.detach(), b.detach(), a_marginal.detach()
        joint, marginal = self.network(a, b), self.network(a_marginal, b)
        mean_exp = torch.exp(marginal).mean()
        value = mean_exp.detach()
        self.moving_average = value if self.moving_average is None else (
            (1 - self.rate) * self.moving_average + self.rate * value)
        log_term = torch.log(mean_exp + 1e-8)
        loss = -(joint.mean() - log_term * value / self.moving_average)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(joint.mean().detach() - log_term.detach())

    @torch.no_grad()
    def estimate(self, a: torch.Tensor, b: torch.Tensor, a_marginal: torch.Tensor) -> float:
        return float(self.lower_bound(a, b, a_marginal))

    def fit(self, a: torch.Tensor, b: torch.Tensor, *, steps: int, batch_size: int = 256,
            generator: torch.Generator | None = None) -> list[float]:
        """Train on samples of the joint (a[i], b[i]); the marginal pairs a[j], b[i] take a of another random draw.
        Returns the per-step bounds."""
        history = []
        for _ in range(steps):
            picks = torch.randint(len(a), (batch_size,), generator=generator)
            others = torch.randint(len(a), (batch_size,), generator=generator)
            history.append(self.step(a[picks], b[picks], a[others]))
        return history


class TriggerGenerator(nn.Module):
    """G: z [N, noise_dim] -> triggers [N, C, k, k] in [0, 1]. z is cut into `chunks` equal parts: the first feeds
    fc1, each later one is concatenated to the previous hidden layer's output (skip inputs), hidden layers are
    BatchNorm1d + LeakyReLU(0.2), the last layer a sigmoid."""

    def __init__(self, trigger_size: int, channels: int, *, noise_dim: int = 64, chunks: int = 4, hidden: int = 512):
        super().__init__()
        if noise_dim % chunks:
            raise UsageError(f"TriggerGenerator: noise_dim={noise_dim} does not split into {chunks} chunks")
        self.trigger_shape = (channels, trigger_size, trigger_size)
        self.noise_dim, self.chunks = noise_dim, chunks
        part = noise_dim // chunks
        self.hidden = nn.ModuleList(
            nn.Sequential(nn.Linear(part if i == 0 else hidden + part, hidden), nn.BatchNorm1d(hidden),
                          nn.LeakyReLU(0.2))
            for i in range(chunks - 1))
        self.out = nn.Linear(hidden + part, channels * trigger_size * trigger_size)

    def noise(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.rand(count, self.noise_dim, generator=generator)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        parts = z.chunk(self.chunks, dim=1)
        hidden = self.hidden[0](parts[0])
        for layer, part in zip(self.hidden[1:], parts[1:-1], strict=True):
            hidden = layer(torch.cat([hidden, part], dim=1))
        flat = torch.sigmoid(self.out(torch.cat([hidden, parts[-1]], dim=1)))
        return flat.view(len(z), *self.trigger_shape)

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        was_training = self.training
        self.eval()
        triggers = self(self.noise(count, generator))
        self.train(was_training)
        return triggers


@dataclass(frozen=True)
class SearchConfig:
    """The trigger search of one generator (official defaults; `epochs` over the defender's data, which on a small
    data set must be many more than the code's 10 over 8000 CIFAR images to give a comparable number of steps)."""

    trigger_size: int = 3
    channels: int = 3
    alpha: float = 0.1
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-4
    adam_betas: tuple[float, float] = (0.5, 0.999)
    noise_dim: int = 64
    chunks: int = 4
    hidden: int = 512
    trigger_noise: float = 0.1
    mine_rate: float = 1e-3
    seed: int = 0

    def validate(self) -> None:
        if self.trigger_size < 1 or self.channels < 1 or self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise UsageError(f"SearchConfig: trigger_size={self.trigger_size}, channels={self.channels}, "
                             f"epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr} must be >= 1, >= 1, "
                             ">= 0, >= 1 and > 0")


@dataclass
class SearchResult:
    """One trained generator, its beta and target, per-epoch (mean target probability, MI estimate), and the mean
    target probability its noise-free triggers attain on the search images at the end."""

    generator: TriggerGenerator
    beta: float
    target: int
    history: list[tuple[float, float]] = field(default_factory=list)
    target_probability: float = float("nan")


def _frozen(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    """Put the model in eval mode with gradients off; returns what to restore."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    return saved


def _target_probability(model: nn.Module, images: torch.Tensor, triggers: torch.Tensor, target: int,
                        generator: torch.Generator) -> torch.Tensor:
    corner = random_locations(1, images.shape[2:], triggers.shape[-1], generator=generator)
    return F.softmax(model(stamp_trigger(images, triggers, corner)), dim=1)[:, target]


def search_trigger(model: nn.Module, images: torch.Tensor, target: int, beta: float,
                   config: SearchConfig | None = None) -> SearchResult:
    """Train one generator whose triggers make `model` output `target` with probability up to beta, as spread out
    as MINE's entropy term allows (GM.search of the official code). The model is frozen and left as it was."""
    config = config or SearchConfig()
    config.validate()
    seed_everything(config.seed)
    draws = torch.Generator().manual_seed(config.seed)
    generator = TriggerGenerator(config.trigger_size, config.channels, noise_dim=config.noise_dim,
                                 chunks=config.chunks, hidden=config.hidden)
    trigger_features = config.channels * config.trigger_size ** 2
    mine = Mine(config.noise_dim, trigger_features, hidden=config.hidden, lr=config.lr, betas=config.adam_betas,
                rate=config.mine_rate)
    optimizer = torch.optim.Adam(generator.parameters(), lr=config.lr, betas=config.adam_betas)
    was_training, saved = model.training, _frozen(model)
    model.eval()
    result = SearchResult(generator, beta, target)
    try:
        for _ in range(config.epochs):
            totals = torch.zeros(3, dtype=torch.float64)
            for batch in torch.randperm(len(images), generator=draws).split(config.batch_size):
                if len(batch) < 2:  # BatchNorm1d needs two triggers
                    continue
                z, z_marginal = generator.noise(len(batch), draws), generator.noise(len(batch), draws)
                triggers = generator(z)
                noisy = triggers + config.trigger_noise * torch.randn(triggers.shape, generator=draws)
                probability = _target_probability(model, images[batch], noisy, target, draws)
                information = mine.lower_bound(z, triggers, z_marginal)
                loss = -torch.clamp(probability, max=beta).mean() - config.alpha * information
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():  # T trains on the updated generator's triggers, as in the code
                    updated = generator(z)
                mine.step(z, updated, z_marginal)
                totals += torch.tensor([float(probability.detach().mean()) * len(batch),
                                        float(information.detach()) * len(batch), len(batch)], dtype=torch.float64)
            result.history.append((float(totals[0] / totals[2]), float(totals[1] / totals[2])))
        result.target_probability = _attained_probability(model, generator, images, target, config)
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was_training)
    return result


@torch.no_grad()
def _attained_probability(model, generator, images, target, config) -> float:
    draws = torch.Generator().manual_seed(config.seed + 1)
    total = 0.0
    for batch in torch.arange(len(images)).split(config.batch_size):
        triggers = generator.sample(len(batch), draws)
        total += float(_target_probability(model, images[batch], triggers, target, draws).sum())
    return total / len(images)


def search_triggers(model: nn.Module, images: torch.Tensor, target: int, betas: Sequence[float] = (0.9, 0.8, 0.5),
                    config: SearchConfig | None = None) -> list[SearchResult]:
    """One generator per beta (the staircase's level sets), each from the same seed."""
    return [search_trigger(model, images, target, beta, config) for beta in betas]


def ensemble_sampler(results: Sequence[SearchResult], seed: int = 0) -> TriggerSource:
    """Triggers from the generators in turn by epoch (epoch % len), the code's equal-weight ensemble."""
    if not results:
        raise UsageError("ensemble_sampler: no generators")
    draws = torch.Generator().manual_seed(seed)
    return lambda count, epoch: results[epoch % len(results)].generator.sample(count, draws)


def detect_target(model: nn.Module, images: torch.Tensor, classes: Sequence[int], beta: float = 0.9,
                  config: SearchConfig | None = None) -> dict[int, float]:
    """The mean target probability a trigger search attains for each candidate class: a backdoored class stands
    out (the code's detect docstring: ~90% for the attacked class only)."""
    return {label: search_trigger(model, images, label, beta, config).target_probability for label in classes}


def poisoned_training(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], triggers: TriggerSource,
                      poison_ratio: float, *, target: int | None = None,
                      config: TrainConfig | None = None) -> nn.Module:
    """Train `model` in place on (images, labels) with each batch poisoned by `poison_batch`: labels set to `target`
    (an attack) or kept (target=None, MESA's retraining). Returns the model in eval mode."""
    config = config or TrainConfig(epochs=10, batch_size=128, optimizer="sgd", lr=1e-3, momentum=0.9, progress=False)
    config.validate()
    if not 0 <= poison_ratio <= 1:
        raise UsageError(f"poison_ratio={poison_ratio} must lie in [0, 1]")
    draws = torch.Generator().manual_seed(config.seed)

    def poison(inputs: torch.Tensor, targets: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return poison_batch(inputs, targets, triggers, poison_ratio, target=target, epoch=epoch, generator=draws)

    images, labels = (torch.as_tensor(t) for t in data)
    Trainer(model, config).fit((images, labels), transform=poison)
    return model.eval()


def backdoor_attack(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], trigger: torch.Tensor, target: int,
                    poison_ratio: float = 0.01, config: TrainConfig | None = None) -> nn.Module:
    """BD.train: fine-tune a clean model with a fraction of each batch stamped with `trigger` and labelled `target`."""
    return poisoned_training(model, data, fixed_trigger(trigger), poison_ratio, target=target, config=config)


def retrain_with_triggers(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], triggers: TriggerSource,
            poison_ratio: float = 0.01, config: TrainConfig | None = None) -> nn.Module:
    """RT.train: fine-tune the backdoored model on clean defender data, a fraction of each batch stamped with sampled
    triggers and keeping its true labels."""
    return poisoned_training(model, data, triggers, poison_ratio, target=None, config=config)


def reverse_trigger(model: nn.Module, images: torch.Tensor, target: int, trigger_size: int, channels: int, *,
                    steps: int = 300, lr: float = 0.1, batch_size: int = 128, seed: int = 0) -> torch.Tensor:
    """The "point" baseline (Neural-Cleanse-like): one trigger [C, k, k] in [0, 1] (a sigmoid of free pixels) reversed
    by Adam on the cross-entropy to `target` over stamped images at random locations. The model is left as it was."""
    draws = torch.Generator().manual_seed(seed)
    pixels = torch.zeros(channels, trigger_size, trigger_size).normal_(generator=draws).requires_grad_()
    optimizer = torch.optim.Adam([pixels], lr=lr)
    was_training, saved = model.training, _frozen(model)
    model.eval()
    try:
        for _ in range(steps):
            batch = torch.randint(len(images), (min(batch_size, len(images)),), generator=draws)
            corner = random_locations(1, images.shape[2:], trigger_size, generator=draws)
            logits = model(stamp_trigger(images[batch], torch.sigmoid(pixels), corner))
            loss = F.cross_entropy(logits, torch.full((len(batch),), target, dtype=torch.long))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was_training)
    return torch.sigmoid(pixels).detach()
