"""A class-conditional GAN with conditional transferring features and rotation self-supervision (methods.md §3).

A DESIGN OF OURS FROM THE ABSTRACT of Wu, Wen, Chen, Li, "Conditional Transferring Features: Scaling GANs to Thousands
of Classes with 30% Less High-quality Data for Training" (IJCNN 2020, arXiv 1909.11308). Only the abstract is known:
transferring features that "capture pixel-level semantic changes when transforming low-quality images into
high-quality ones" condition the GAN, self-supervision adds label-free signal, and a GAN trained on 70% of the
high-quality (HQ) images plus some low-quality (LQ) ones beats previous methods. Architecture, degradation, losses and
weights are not published; every concrete choice below is ours, and nothing here reproduces the paper's numbers.

    pools = quality_pools(x_train, y_train, hq_fraction=0.7, seed=0)                 # gan_transfer.py
    branch = train_transfer(pools.hq_x, pools.hq_y, TransferConfig(seed=0))
    result = train_gan(pools.hq_x, pools.hq_y, GANConfig(seed=0), transfer=branch, lq=(pools.lq_x, pools.lq_y))
    images = result.sampler.sample(torch.arange(10).repeat(10), seed=0)               # [100, 1, 8, 8] in [0, 1]

The pieces and the choices they make:
  cGAN            Generator: [z, embed(y), t] -> linear -> 2x2 grid -> two (2x nearest upsample, 3x3 conv, BatchNorm,
                  ReLU) stages -> 3x3 conv -> sigmoid (images in [0, 1], 8x8, or any size divisible by 4).
                  ProjectionDiscriminator (Miyato & Koyama 2018): spectrally normalised convolutions with LeakyReLU,
                  sum pooling to h, score = linear(h) + <embed(y), h>. Hinge loss: D minimises
                  E[relu(1 - D(x, y))] + E[relu(1 + D(G(z, y'), y'))], G minimises -E[D(G(z, y'), y')]. Adam
                  (betas 0, 0.9; lr 2e-4 for G, 8e-4 for D), one D step per G step. After training, the
                  generator's BatchNorm statistics are re-estimated over `recalibration_batches` batches of sampled
                  conditions (BigGAN's "standing statistics"), so the eval-mode generator, the one exported, is the
                  one measured.
  rotation        SS-GAN's self-supervision (Chen et al. 2019, our reading of "self-supervised learning integrated
                  into the GAN"): a 4-way linear head on h predicts the rotation (0/90/180/270 degrees, one drawn per
                  image) of rotated images; D adds rotation_weight * CE on rotated REAL images, G adds
                  generator_rotation_weight * CE on rotated fakes (SS-GAN's beta = 1, alpha = 0.2 by default).
  transfer        (gan_transfer.py) An encoder E maps an image to `features` numbers; a transfer module T learns
                  the LQ -> HQ feature change of class y, t = E(lq) + MLP([E(lq), onehot(y)]); a decoder Dec turns
                  features back into pixels. They train on pairs (degrade(hq), hq) made from the HQ pool only
                  (degrade = average-pool 2x and bilinear upsampling, Gaussian blur, Gaussian noise, seeded), with
                  |Dec(E(hq)) - hq|^2 + |Dec(t) - hq|^2 + |t - sg(E(hq))|^2: the pixel terms tie the features to the
                  image and the feature term makes t the HQ feature of the LQ input. Then E and T are frozen.
  conditioning    The generator is conditioned on the class and a transfer feature t drawn with its label from the
                  feature pool: E(x) of every HQ training image and T(E(lq), y) of every LQ image, so the LQ pool
                  (degraded copies of samples NOT in the HQ pool) contributes the HQ features it is estimated to
                  have, while the discriminator sees HQ images only. The pool is standardised (per dimension zero
                  mean, unit variance) and G adds feature_weight * |E'(G(z, y, t)) - t|^2, E' the standardised
                  encoder, so that t determines what it draws, on the scale of the hinge loss. For sampling without
                  an LQ input, a learned class prior (ClassPrior: a diagonal Gaussian per class, maximum-likelihood
                  on the pool) gives t.
What the digits sample measured (README): the transfer GAN beats plain cGANs on 70% and 100% HQ, but the same GAN
without the LQ pool does as well, so on digits the gain is the feature conditioning's, not the LQ data's.
GanSampler is what is exported: (noise [N, noise_dim], labels [N] int64) -> images [N, 1, H, W]; the first z_dim
noise values are z and the rest (transfer GANs) the prior's eps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

from optimizer.errors import UsageError
from optimizer.training.gan_transfer import ClassPrior, TransferBranch


class Generator(nn.Module):
    """(z [N, z_dim], labels [N], t [N, features] or None) -> images [N, 1, size, size] in [0, 1]."""

    def __init__(self, classes: int = 10, *, z_dim: int = 32, features: int = 0, size: int = 8, width: int = 64,
                 embedding: int = 16):
        super().__init__()
        if size % 4:
            raise UsageError(f"Generator: size={size} must be divisible by 4")
        self.z_dim, self.feature_count, self.size, self.width = z_dim, features, size, width
        self.embed = nn.Embedding(classes, embedding)
        self.linear = nn.Linear(z_dim + embedding + features, 2 * width * (size // 4) ** 2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(2 * width, width, 3, padding=1),
            nn.BatchNorm2d(width), nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width // 2, 3, padding=1),
            nn.BatchNorm2d(width // 2), nn.ReLU(),
            nn.Conv2d(width // 2, 1, 3, padding=1),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        parts = [z, self.embed(labels)]
        if self.feature_count:
            if t is None:
                raise UsageError("Generator: this generator is conditioned on transfer features; pass t")
            parts.append(t)
        grid = self.linear(torch.cat(parts, dim=1)).view(len(z), 2 * self.width, self.size // 4, self.size // 4)
        return torch.sigmoid(self.body(grid))


class ProjectionDiscriminator(nn.Module):
    """(images, labels) -> (scores [N], rotation logits [N, 4]); spectral norm on every convolution and linear map of
    the adversarial path, the class entering by projection <embed(y), h>."""

    def __init__(self, classes: int = 10, *, width: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            spectral_norm(nn.Conv2d(1, width // 2, 3, padding=1)), nn.LeakyReLU(0.1),
            spectral_norm(nn.Conv2d(width // 2, width, 4, stride=2, padding=1)), nn.LeakyReLU(0.1),
            spectral_norm(nn.Conv2d(width, 2 * width, 3, padding=1)), nn.LeakyReLU(0.1),
        )
        self.score = spectral_norm(nn.Linear(2 * width, 1))
        self.embed = spectral_norm(nn.Embedding(classes, 2 * width))
        self.rotation_head = nn.Linear(2 * width, 4)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images).sum(dim=(2, 3))

    def adversarial(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.score(h).squeeze(1) + (self.embed(labels) * h).sum(1)

    def rotation(self, h: torch.Tensor) -> torch.Tensor:
        return self.rotation_head(h)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(images)
        return self.adversarial(h, labels), self.rotation(h)


def discriminator_hinge_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """mean(relu(1 - real)) + mean(relu(1 + fake)). Example: real (2, 0.5), fake (-2, 0) -> 0.25 + 0.5 = 0.75."""
    return F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()


def generator_hinge_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """-mean(fake). Example: fake (1, -3) -> 1."""
    return -fake_scores.mean()


def rotate(images: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Each image [N, C, H, W] (H == W) turned counter-clockwise by rotations[i] * 90 degrees (torch.rot90)."""
    out = images.clone()
    for k in range(1, 4):
        chosen = rotations == k
        if chosen.any():
            out[chosen] = torch.rot90(images[chosen], k, dims=(2, 3))
    return out


def rotation_loss(logits: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 4-way rotation logits. Example: all-zero logits -> log 4 = 1.386."""
    return F.cross_entropy(logits, rotations)


@dataclass(frozen=True)
class GANConfig:
    """steps of (one D step, one G step) on batches of batch_size; Adam lr_g / lr_d with betas; z_dim noise values;
    width of both networks; rotation_weight (D, on real images; 0 removes the rotation head from training) and
    generator_rotation_weight (G, on fakes); feature_weight of G's |E(G(z, y, t)) - t|^2 (transfer GANs only);
    recalibration_batches of the BatchNorm standing statistics; seed fixes initialisation and every draw."""

    steps: int = 800
    batch_size: int = 64
    lr_g: float = 2e-4
    lr_d: float = 8e-4
    betas: tuple[float, float] = (0.0, 0.9)
    z_dim: int = 32
    width: int = 32
    rotation_weight: float = 1.0
    generator_rotation_weight: float = 0.2
    feature_weight: float = 1.0
    recalibration_batches: int = 20
    log_every: int = 100
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr_g <= 0 or self.lr_d <= 0 or self.z_dim < 1:
            raise UsageError(f"GANConfig: steps={self.steps}, batch_size={self.batch_size}, lr_g={self.lr_g}, lr_d="
                             f"{self.lr_d}, z_dim={self.z_dim} must be >= 0, >= 1, > 0, > 0 and >= 1")
        weights = (self.rotation_weight, self.generator_rotation_weight, self.feature_weight)
        if min(weights) < 0 or self.width < 4 or self.recalibration_batches < 0 or self.log_every < 1:
            raise UsageError(f"GANConfig: rotation_weight, generator_rotation_weight, feature_weight = {weights} must "
                             f"be >= 0, width={self.width} >= 4, recalibration_batches="
                             f"{self.recalibration_batches} >= 0, log_every={self.log_every} >= 1")


class GanSampler(nn.Module):
    """The exported sampling path: (noise [N, noise_dim], labels [N]) -> images; noise = [z, eps] where eps feeds the
    class prior of a transfer GAN (noise_dim = z_dim + features) and is absent for a plain cGAN (noise_dim = z_dim)."""

    def __init__(self, generator: Generator, prior: ClassPrior | None = None):
        super().__init__()
        self.generator, self.prior = generator, prior
        self.noise_dim = generator.z_dim + (generator.feature_count if prior is not None else 0)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = noise[:, :self.generator.z_dim]
        t = self.prior(labels, noise[:, self.generator.z_dim:]) if self.prior is not None else None
        return self.generator(z, labels, t)

    def noise(self, count: int, *, seed: int = 0) -> torch.Tensor:
        return torch.randn(count, self.noise_dim, generator=torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, *, seed: int = 0, batch_size: int = 500) -> torch.Tensor:
        """Images of the requested classes from seeded noise, in eval mode (the mode that is exported)."""
        was_training = self.training
        self.eval()
        noise = self.noise(len(labels), seed=seed)
        try:
            return torch.cat([self(noise[s:s + batch_size], labels[s:s + batch_size])
                              for s in range(0, len(labels), batch_size)])
        finally:
            self.train(was_training)


@dataclass
class GANResult:
    """The trained sampler (eval mode), the discriminator, the standardised feature pool and its labels that the
    generator was conditioned on (None for a plain cGAN) and one record per log_every steps (d_loss, g_loss,
    rotation accuracy on real images)."""

    sampler: GanSampler
    discriminator: ProjectionDiscriminator
    pool: tuple[torch.Tensor, torch.Tensor] | None
    history: list[dict] = field(default_factory=list)


class _Conditions:
    """Draws (labels, transfer features or None) for fakes: from the real labels for a plain cGAN, from the feature
    pool (HQ features and transferred LQ features, with their labels) for a transfer GAN."""

    def __init__(self, labels: torch.Tensor, features: torch.Tensor | None, generator: torch.Generator):
        self.labels, self.features, self.generator = labels, features, generator

    def draw(self, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        index = torch.randint(len(self.labels), (count,), generator=self.generator)
        return self.labels[index], None if self.features is None else self.features[index]


class _Standardized(nn.Module):
    """encoder(x) standardised with the pool's per-dimension mean and std (what the generator is conditioned on)."""

    def __init__(self, encoder: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.encoder, self.mean, self.std = encoder, mean, std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.encoder(images) - self.mean) / self.std


def _feature_pool(branch: TransferBranch, real: tuple[torch.Tensor, torch.Tensor],
                  lq: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, _Standardized]:
    """The standardised pool features, their labels, and the encoder standardised the same way."""
    with torch.no_grad():
        features, labels = [branch.features(real[0])], [real[1]]
        if lq is not None:
            features.append(branch.transfer(*lq))
            labels.append(lq[1])
        features = torch.cat(features)
        mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    return (features - mean) / std, torch.cat(labels), _Standardized(branch.encoder, mean, std)


def _discriminator_step(d, g, optimizer, real, conditions, config, generator) -> tuple[float, float]:
    x, y = real
    y_fake, t_fake = conditions.draw(len(y))
    with torch.no_grad():
        fake = g(torch.randn(len(y), config.z_dim, generator=generator), y_fake, t_fake)
    h_real = d.features(x)
    loss = discriminator_hinge_loss(d.adversarial(h_real, y), d.adversarial(d.features(fake), y_fake))
    rotation_accuracy = float("nan")
    if config.rotation_weight:
        turns = torch.randint(4, (len(x),), generator=generator)
        logits = d.rotation(d.features(rotate(x, turns)))
        loss = loss + config.rotation_weight * rotation_loss(logits, turns)
        rotation_accuracy = float((logits.argmax(1) == turns).float().mean())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach()), rotation_accuracy


def _generator_step(d, g, optimizer, conditions, config, generator, encoder) -> float:
    y_fake, t_fake = conditions.draw(config.batch_size)
    fake = g(torch.randn(config.batch_size, config.z_dim, generator=generator), y_fake, t_fake)
    loss = generator_hinge_loss(d.adversarial(d.features(fake), y_fake))
    if config.generator_rotation_weight and config.rotation_weight:
        turns = torch.randint(4, (len(fake),), generator=generator)
        loss = loss + config.generator_rotation_weight * rotation_loss(d.rotation(d.features(rotate(fake, turns))),
                                                                       turns)
    if encoder is not None and config.feature_weight:
        loss = loss + config.feature_weight * F.mse_loss(encoder(fake), t_fake)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def recalibrate(sampler: GanSampler, classes: int, *, batches: int, batch_size: int, seed: int) -> None:
    """Re-estimate the generator's BatchNorm running statistics as the plain average over `batches` batches of
    sampled conditions (uniform classes, prior features), so that eval mode matches what training produced."""
    norms = [m for m in sampler.generator.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms or batches == 0:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    generator = torch.Generator().manual_seed(seed)
    sampler.train()
    for _ in range(batches):
        labels = torch.randint(classes, (batch_size,), generator=generator)
        sampler(torch.randn(batch_size, sampler.noise_dim, generator=generator), labels)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    sampler.eval()


def train_gan(images: torch.Tensor, labels: torch.Tensor, config: GANConfig | None = None, *,
              transfer: TransferBranch | None = None, lq: tuple[torch.Tensor, torch.Tensor] | None = None,
              classes: int = 10) -> GANResult:
    """Train a conditional GAN on the real (images, labels) (module docstring). With `transfer`, the generator is
    conditioned on transfer features from the pool of E(images) and, when `lq` = (LQ images, labels) is given,
    T(E(lq), y); the discriminator only ever sees `images`. Without `transfer`, `lq` must be None (a plain cGAN has
    no way to use LQ images except as real ones: concatenate them to `images` for that baseline)."""
    config = config or GANConfig()
    config.validate()
    if lq is not None and transfer is None:
        raise UsageError("train_gan: LQ images need the transfer branch (pass transfer=); to use them as if they "
                         "were HQ, concatenate them to the real images")
    if len(images) != len(labels) or images.dim() != 4:
        raise UsageError(f"train_gan: images must be [N, 1, H, W] with one label each, got {list(images.shape)} "
                         f"and {len(labels)} labels")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    features = transfer.feature_count if transfer is not None else 0
    g = Generator(classes, z_dim=config.z_dim, features=features, size=images.shape[-1], width=config.width)
    d = ProjectionDiscriminator(classes, width=config.width)
    pool, encoder, prior, conditions = None, None, None, _Conditions(labels, None, generator)
    if transfer is not None:
        features, pool_labels, encoder = _feature_pool(transfer, (images, labels), lq)
        pool = (features, pool_labels)
        conditions = _Conditions(pool_labels, features, generator)
        prior = ClassPrior.fit(features, pool_labels, classes)
    g_optimizer = torch.optim.Adam(g.parameters(), lr=config.lr_g, betas=config.betas)
    d_optimizer = torch.optim.Adam(d.parameters(), lr=config.lr_d, betas=config.betas)
    history, totals = [], torch.zeros(4, dtype=torch.float64)
    for step in range(config.steps):
        batch = torch.randint(len(images), (config.batch_size,), generator=generator)
        d_loss, rotation_accuracy = _discriminator_step(d, g, d_optimizer, (images[batch], labels[batch]), conditions,
                                                        config, generator)
        d.requires_grad_(False)
        g_loss = _generator_step(d, g, g_optimizer, conditions, config, generator, encoder)
        d.requires_grad_(True)
        totals += torch.tensor([d_loss, g_loss, rotation_accuracy, 1.0], dtype=torch.float64)
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            history.append({"step": step + 1, "d_loss": float(totals[0] / totals[3]),
                            "g_loss": float(totals[1] / totals[3]), "rotation_accuracy": float(totals[2] / totals[3])})
            totals.zero_()
    sampler = GanSampler(g, prior)
    recalibrate(sampler, classes, batches=config.recalibration_batches, batch_size=config.batch_size,
                seed=config.seed + 1)
    d.eval()
    return GANResult(sampler.eval(), d, pool, history)
