"""The low-quality side of the conditional transferring-features GAN (gan.py has the design): degradation, the HQ/LQ
data protocol, the transfer branch (encoder, transfer module, decoder) and the learned class prior over features.

    pools = quality_pools(x_train, y_train, hq_fraction=0.7, degradation=Degradation(), seed=0)
    branch = train_transfer(pools.hq_x, pools.hq_y, TransferConfig(steps=600), classes=10)
    t_lq = branch.transfer(pools.lq_x, pools.lq_y)          # estimated HQ features of the LQ images
    prior = ClassPrior.fit(torch.cat([branch.features(pools.hq_x), t_lq]), torch.cat([pools.hq_y, pools.lq_y]), 10)

Images are [N, 1, H, W] in [0, 1] with H and W divisible by `Degradation.factor`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from optimizer.errors import UsageError


@dataclass(frozen=True)
class Degradation:
    """HQ -> LQ: average-pool by `factor` and upsample back (bilinear), blur with a Gaussian of std `blur_sigma`
    pixels (kernel 2*ceil(2 sigma)+1, reflect padding; 0 = none), add Gaussian noise of std `noise_std`, clip to
    [0, 1]. The noise is the only random part; degrade() draws it from a seeded generator."""

    factor: int = 2
    blur_sigma: float = 0.5
    noise_std: float = 0.1

    def validate(self) -> None:
        if self.factor < 1 or self.blur_sigma < 0 or self.noise_std < 0:
            raise UsageError(f"Degradation: factor={self.factor}, blur_sigma={self.blur_sigma}, noise_std="
                             f"{self.noise_std} must be >= 1, >= 0 and >= 0")


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The normalised 1-D Gaussian of std `sigma` over 2*ceil(2 sigma)+1 taps (tensor([1.]) for sigma 0)."""
    if sigma == 0:
        return torch.ones(1)
    radius = math.ceil(2 * sigma)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    return (kernel / kernel.sum()).float()


def degrade(images: torch.Tensor, degradation: Degradation | None = None, *, seed: int | None = None,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """The LQ copies of `images` [N, 1, H, W] (see Degradation); the same seed gives the same copies.

    Example: with Degradation(factor=2, blur_sigma=0, noise_std=0), a 2x2 block [[0, 1], [1, 1]] of an image becomes
    its mean 0.75 smoothed bilinearly with its neighbours.
    """
    degradation = degradation or Degradation()
    degradation.validate()
    if images.dim() != 4 or images.shape[2] % degradation.factor or images.shape[3] % degradation.factor:
        raise UsageError(f"degrade: images must be [N, C, H, W] with H, W divisible by {degradation.factor}, "
                         f"got {list(images.shape)}")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    x = images
    if degradation.factor > 1:
        x = F.interpolate(F.avg_pool2d(x, degradation.factor), size=images.shape[2:], mode="bilinear",
                          align_corners=False)
    if degradation.blur_sigma > 0:
        kernel = gaussian_kernel(degradation.blur_sigma).to(x.dtype)
        pad = len(kernel) // 2
        channels = x.shape[1]
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        x = F.conv2d(x, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
        x = F.conv2d(x, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    if degradation.noise_std > 0:
        x = x + degradation.noise_std * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x.clamp(0.0, 1.0)


@dataclass
class QualityPools:
    """The data protocol: HQ images (a seeded, per-class `hq_fraction` of the data), LQ images (degraded copies of
    the REST, with their labels) and `lq_sources`, the HQ originals of the LQ images (for diagnostics only; training
    never sees them)."""

    hq_x: torch.Tensor
    hq_y: torch.Tensor
    lq_x: torch.Tensor
    lq_y: torch.Tensor
    lq_sources: torch.Tensor
    hq_index: torch.Tensor
    lq_index: torch.Tensor


def quality_pools(images: torch.Tensor, labels: torch.Tensor, *, hq_fraction: float = 0.7,
                  degradation: Degradation | None = None, seed: int = 0) -> QualityPools:
    """Split (images, labels) per class into round(hq_fraction * n_c) HQ samples and LQ copies of the others.

    Example: 100 images of each of 10 classes, hq_fraction 0.7 -> 700 HQ and 300 disjoint LQ images.
    """
    if not 0 < hq_fraction <= 1:
        raise UsageError(f"quality_pools: hq_fraction={hq_fraction} must be in (0, 1]")
    if len(images) != len(labels):
        raise UsageError(f"quality_pools: {len(images)} images but {len(labels)} labels")
    generator = torch.Generator().manual_seed(seed)
    hq, lq = [], []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        keep = round(hq_fraction * len(members))
        hq.append(members[:keep])
        lq.append(members[keep:])
    hq_index, lq_index = torch.cat(hq).sort().values, torch.cat(lq).sort().values
    sources = images[lq_index]
    return QualityPools(images[hq_index], labels[hq_index], degrade(sources, degradation, generator=generator),
                        labels[lq_index], sources, hq_index, lq_index)


class Encoder(nn.Module):
    """[N, 1, H, W] -> [N, features]: two 3x3 convolutions (the second strided), then a linear map."""

    def __init__(self, features: int = 16, size: int = 8, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.LeakyReLU(0.1),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.1), nn.Flatten(),
            nn.Linear(2 * width * (size // 2) ** 2, features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Decoder(nn.Module):
    """[N, features] -> [N, 1, H, W] in [0, 1]: a linear map to a half-size grid, a 2x upsampling and two convs."""

    def __init__(self, features: int = 16, size: int = 8, width: int = 32):
        super().__init__()
        self.size, self.width = size, width
        self.linear = nn.Linear(features, 2 * width * (size // 2) ** 2)
        self.body = nn.Sequential(
            nn.LeakyReLU(0.1), nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(2 * width, width, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        grid = self.linear(f).view(len(f), 2 * self.width, self.size // 2, self.size // 2)
        return torch.sigmoid(self.body(grid))


class TransferModule(nn.Module):
    """The conditional transferring features: t = f + MLP([f, onehot(y)]), the LQ -> HQ feature change of class y."""

    def __init__(self, features: int = 16, classes: int = 10, hidden: int = 64):
        super().__init__()
        self.classes = classes
        self.mlp = nn.Sequential(nn.Linear(features + classes, hidden), nn.LeakyReLU(0.1),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, features))

    def forward(self, f: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return f + self.mlp(torch.cat([f, F.one_hot(labels, self.classes).to(f.dtype)], dim=1))


@dataclass(frozen=True)
class TransferConfig:
    """Training of the transfer branch on (degrade(HQ), HQ) pairs, the noise drawn afresh every step from a
    generator seeded with `seed`: `steps` Adam steps (lr) of batch_size pairs. The loss is
    |Dec(E(hq)) - hq|^2 + |Dec(t) - hq|^2 + feature_weight * |t - sg(E(hq))|^2, t = T(E(degrade(hq)), y)."""

    features: int = 16
    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    feature_weight: float = 1.0
    degradation: Degradation = Degradation()
    seed: int = 0

    def validate(self) -> None:
        if self.features < 1 or self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or self.feature_weight < 0:
            raise UsageError(f"TransferConfig: features={self.features}, steps={self.steps}, batch_size="
                             f"{self.batch_size}, lr={self.lr}, feature_weight={self.feature_weight} must be >= 1, "
                             ">= 0, >= 1, > 0 and >= 0")
        self.degradation.validate()


class TransferBranch(nn.Module):
    """Encoder E, transfer module T and decoder Dec. features(x) = E(x) for HQ images; transfer(lq, y) = T(E(lq), y),
    the estimated HQ features of LQ images; restore(lq, y) = Dec(transfer(lq, y)) shows them as images."""

    def __init__(self, features: int = 16, classes: int = 10, size: int = 8):
        super().__init__()
        self.encoder = Encoder(features, size)
        self.transfer_module = TransferModule(features, classes)
        self.decoder = Decoder(features, size)
        self.feature_count = features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def transfer(self, lq: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.transfer_module(self.encoder(lq), labels)

    def restore(self, lq: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transfer(lq, labels))

    def loss(self, hq: torch.Tensor, lq: torch.Tensor, labels: torch.Tensor, feature_weight: float) -> torch.Tensor:
        f_hq = self.encoder(hq)
        t = self.transfer(lq, labels)
        return (F.mse_loss(self.decoder(f_hq), hq) + F.mse_loss(self.decoder(t), hq)
                + feature_weight * F.mse_loss(t, f_hq.detach()))


def train_transfer(hq: torch.Tensor, labels: torch.Tensor, config: TransferConfig | None = None, *,
                   classes: int = 10) -> TransferBranch:
    """A TransferBranch trained on pairs made by degrading the HQ images (TransferConfig); returned frozen, in eval
    mode. Only HQ images are used: the LQ pool's originals are never seen."""
    config = config or TransferConfig()
    config.validate()
    torch.manual_seed(config.seed)
    branch = TransferBranch(config.features, classes, hq.shape[-1])
    optimizer = torch.optim.Adam(branch.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    for _ in range(config.steps):
        batch = torch.randint(len(hq), (config.batch_size,), generator=generator)
        x = hq[batch]
        lq = degrade(x, config.degradation, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        branch.loss(x, lq, labels[batch], config.feature_weight).backward()
        optimizer.step()
    branch.eval().requires_grad_(False)
    return branch


class ClassPrior(nn.Module):
    """A diagonal Gaussian per class over transfer features, for sampling without an LQ input:
    t = mean[y] + exp(log_std[y]) * eps, eps ~ N(0, I). `fit` sets mean and log_std to their maximum-likelihood
    values (per-class sample mean and standard deviation, floored at `min_std`)."""

    def __init__(self, classes: int, features: int):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(classes, features), requires_grad=False)
        self.log_std = nn.Parameter(torch.zeros(classes, features), requires_grad=False)

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, classes: int, *, min_std: float = 1e-3) -> ClassPrior:
        """Example: features [[0], [2]] of class 0 -> mean 1, std 1 (the biased, maximum-likelihood estimate)."""
        prior = cls(classes, features.shape[1])
        with torch.no_grad():
            for label in range(classes):
                members = features[labels == label]
                if len(members) == 0:
                    raise UsageError(f"ClassPrior.fit: class {label} has no features")
                prior.mean[label] = members.mean(0)
                prior.log_std[label] = members.std(0, correction=0).clamp_min(min_std).log()
        return prior

    def forward(self, labels: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.mean[labels] + self.log_std[labels].exp() * eps
