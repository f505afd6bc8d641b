"""Activation sparsity in training: DASNet winners-take-all dropout and JPnet activation thresholds.

Both modules compute their mask with the same operations the `activation-prune` pass inserts, so a trained model
exports (torch.onnx.export, eval mode) to the same ONNX pattern and the same numbers:

    WTADropout(keep=0.25)            channel: ReduceMean -> Flatten -> TopK -> Slice -> GreaterOrEqual -> Cast
                                              -> Unsqueeze -> Mul
                                     element: Flatten -> TopK -> Slice -> GreaterOrEqual -> Cast -> Reshape -> Mul
    ActivationThreshold(t)           Greater -> Cast -> Mul

Place them right after the activation they mask, e.g. `nn.Sequential(conv, bn, nn.ReLU(), WTADropout(0.3), pool)`.
Gradients flow only through the kept activations (the 0/1 mask is a constant of the input), which is how WTA
training teaches the network to work with few winners.

JPnet thresholds come in two trainable flavours:
- scheduled: `target_sparsity` set (e.g. ramped by `ThresholdSchedule`): in training mode each batch moves t
  towards the batch quantile that gives that sparsity (exponential moving average);
- learnable: t is a parameter trained through a sigmoid straight-through estimator; add `activation_density(model)`
  to the loss to push thresholds up.

Preconditions: inputs are batch first; channel granularity ranks the channels of axis 1 over the spatial axes 2..;
`magnitude=True` scores |x| (for signed activations), otherwise x itself (ReLU outputs).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from optimizer.activation_stats import wta_k


class WTADropout(nn.Module):
    """DASNet winners-take-all: keep the `keep` fraction of strongest channels (or elements) of each sample."""

    def __init__(
        self,
        keep: float,
        *,
        granularity: Literal["channel", "element"] = "channel",
        score: Literal["mean", "max"] = "mean",
        magnitude: bool = False,
    ):
        super().__init__()
        self.set_keep(keep)
        self.granularity, self.score, self.magnitude = granularity, score, magnitude

    def set_keep(self, keep: float) -> None:
        """Change the kept fraction (e.g. ramp it down during training); k = ceil(keep * units), at least 1."""
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"WTADropout keep={keep} must be in (0, 1]")
        self.keep = keep

    def extra_repr(self) -> str:
        return f"keep={self.keep}, granularity={self.granularity}, score={self.score}, magnitude={self.magnitude}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source = x.abs() if self.magnitude else x
        if self.granularity == "channel" and x.dim() >= 3:
            spatial = tuple(range(2, x.dim()))
            if self.score == "mean":
                score = source.mean(dim=spatial, keepdim=True)
            else:
                score = source.amax(dim=spatial, keepdim=True)
            flat = score.flatten(1)
            mask = (flat >= _kth_largest(flat, wta_k(self.keep, flat.shape[1]))).to(x.dtype)
            for _ in spatial:
                mask = mask.unsqueeze(-1)
            return x * mask
        flat = source if x.dim() == 2 else source.flatten(1)
        mask = (flat >= _kth_largest(flat, wta_k(self.keep, flat.shape[1]))).to(x.dtype)
        return x * (mask if x.dim() == 2 else mask.reshape_as(x))


def _kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    return flat.topk(k, dim=1).values[:, -1:]


class ActivationThreshold(nn.Module):
    """JPnet activation pruning: y = x * (x > t) (or |x| > t with magnitude=True), one t per module."""

    def __init__(
        self,
        threshold: float = 0.0,
        *,
        learnable: bool = False,
        target_sparsity: float | None = None,
        momentum: float = 0.1,
        temperature: float = 0.05,
        magnitude: bool = False,
    ):
        super().__init__()
        value = torch.tensor(float(threshold))
        if learnable:
            self.threshold = nn.Parameter(value)
        else:
            self.register_buffer("threshold", value)
        self.learnable, self.target_sparsity, self.momentum = learnable, target_sparsity, momentum
        self.temperature, self.magnitude = temperature, magnitude
        self.density: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"threshold={float(self.threshold):.4g}, learnable={self.learnable}, target={self.target_sparsity}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source = x.abs() if self.magnitude else x
        if self.training and self.target_sparsity is not None:
            self._follow_target(source)
        hard = (source > self.threshold).to(x.dtype)
        if not (self.training and self.learnable):
            return x * hard
        soft = torch.sigmoid((source - self.threshold) / self.temperature)
        self.density = soft.mean()
        return x * (hard + soft - soft.detach())

    @torch.no_grad()
    def _follow_target(self, source: torch.Tensor) -> None:
        values = source.detach().flatten()
        if values.numel() > 1 << 20:  # torch.quantile rejects inputs above 16M elements; a strided sample suffices
            values = values[:: values.numel() // (1 << 20) + 1]
        quantile = torch.quantile(values.float(), self.target_sparsity).clamp(min=0.0)
        self.threshold.mul_(1.0 - self.momentum).add_(self.momentum * quantile.to(self.threshold.dtype))


def activation_density(model: nn.Module) -> torch.Tensor:
    """Sum over learnable ActivationThreshold modules of the last batch's soft kept fraction (a loss term)."""
    terms = [m.density for m in model.modules() if isinstance(m, ActivationThreshold) and m.density is not None]
    return torch.stack(terms).sum() if terms else torch.zeros(())


class ThresholdSchedule:
    """Ramps every ActivationThreshold's target sparsity linearly from 0 to `final_sparsity` over `steps` calls."""

    def __init__(self, model: nn.Module, final_sparsity: float, steps: int):
        if not 0.0 <= final_sparsity < 1.0 or steps < 1:
            raise ValueError(
                f"ThresholdSchedule needs 0 <= final_sparsity < 1 and steps >= 1, got {final_sparsity}, {steps}"
            )
        self.modules = [m for m in model.modules() if isinstance(m, ActivationThreshold)]
        self.final_sparsity, self.steps, self.count = final_sparsity, steps, 0
        self.step()

    def step(self) -> float:
        """Advance one step; returns the target now in force."""
        target = self.final_sparsity * min(1.0, self.count / self.steps)
        for module in self.modules:
            module.target_sparsity = target
        self.count += 1
        return target
