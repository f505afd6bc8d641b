"""An x-vector TDNN (Snyder et al. 2018), scaled down to train in minutes on two CPU cores.

Frame layers are dilated Conv1d over [batch, mel bands, frames] with contexts {t-2..t+2}, {t-2, t, t+2},
{t-3, t, t+3}, {t}, {t} and no padding (each layer sees only real frames), each followed by ReLU.
Statistics pooling concatenates the per-channel mean and standard deviation over time; the first
segment layer's output is the speaker embedding (Kaldi's "embedding a"); a second segment layer and a
speaker classifier exist only for training. No BatchNorm: a channel whose weights and bias are all zero
then outputs exactly zero, which is what lets structured sparsity turn into removable channels.

Toy use:
    model = XVectorTDNN(n_speakers=60)
    model.embed(torch.randn(2, 24, 300)).shape   # (2, 128)
"""

from __future__ import annotations

import torch
from torch import nn

from samples.speaker.features import N_MELS

# (kernel size, dilation) of each frame layer: the contexts {t-2..t+2}, {t-2,t,t+2}, {t-3,t,t+3}, {t}, {t}.
FRAME_CONTEXTS = ((5, 1), (3, 2), (3, 3), (1, 1), (1, 1))
# The statistics layer is the widest, as in Kaldi's x-vector (512 frame units, 1500 before pooling): mean and
# standard deviation of many channels make a rich utterance summary, and it is also where most redundancy lies.
DEFAULT_FRAME_CHANNELS = (64, 64, 64, 64, 1024)
# Floor under the variance in statistics pooling: keeps sqrt differentiable when a channel is constant.
VARIANCE_FLOOR = 1e-8


class StatisticsPooling(nn.Module):
    """[batch, channels, frames] -> [batch, 2 * channels]: per-channel mean, then per-channel standard deviation."""

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        mean = frames.mean(dim=2)
        variance = (frames * frames).mean(dim=2) - mean * mean
        return torch.cat([mean, torch.sqrt(torch.clamp(variance, min=VARIANCE_FLOOR))], dim=1)


class XVectorTDNN(nn.Module):
    def __init__(
        self,
        n_speakers: int,
        n_mels: int = N_MELS,
        frame_channels: tuple[int, ...] = DEFAULT_FRAME_CHANNELS,
        embedding_dim: int = 128,
        batch_norm: bool = True,
    ):
        super().__init__()
        if len(frame_channels) != len(FRAME_CONTEXTS):
            raise ValueError(f"need {len(FRAME_CONTEXTS)} frame layer widths, got {len(frame_channels)}")
        layers: list[nn.Module] = []
        in_channels = n_mels
        for out_channels, (kernel, dilation) in zip(frame_channels, FRAME_CONTEXTS, strict=True):
            layers.append(nn.Conv1d(in_channels, out_channels, kernel, dilation=dilation))
            if batch_norm:
                layers.append(nn.BatchNorm1d(out_channels))
            layers.append(nn.ReLU())
            in_channels = out_channels
        self.frame_layers = nn.Sequential(*layers)
        self.pooling = StatisticsPooling()
        self.segment6 = nn.Linear(2 * in_channels, embedding_dim)
        self.segment7 = nn.Linear(embedding_dim, embedding_dim)
        self.classifier = nn.Linear(embedding_dim, n_speakers)

    @property
    def receptive_field(self) -> int:
        return 1 + sum((kernel - 1) * dilation for kernel, dilation in FRAME_CONTEXTS)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """[batch, mel bands, frames] -> [batch, embedding_dim]; frames must exceed the receptive field (15)."""
        return self.segment6(self.pooling(self.frame_layers(features)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Speaker logits (training only)."""
        hidden = torch.relu(self.segment7(torch.relu(self.embed(features))))
        return self.classifier(hidden)


class EmbeddingExtractor(nn.Module):
    """What is deployed: features in, embedding out. It shares the trained modules under the same names, so the
    exported initializers are named like the training model's parameters (frame_layers.0.weight, ...)."""

    def __init__(self, model: XVectorTDNN):
        super().__init__()
        self.frame_layers = model.frame_layers
        self.pooling = model.pooling
        self.segment6 = model.segment6
        # Shared modules: start in the source model's mode, so whoever restores "our" mode restores its mode.
        self.train(model.training)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.segment6(self.pooling(self.frame_layers(features)))


def fold_batch_norm(model: XVectorTDNN) -> XVectorTDNN:
    """The same function without BatchNorm: each frame layer's BatchNorm (eval statistics) folded into its Conv1d.

    With BatchNorm a filter's scale is free (the norm undoes it), so a penalty on weights cannot switch a
    channel off; on the folded model group Lasso acts on the channel's real contribution.
    """
    convs = [m for m in model.frame_layers if isinstance(m, nn.Conv1d)]
    norms = [m for m in model.frame_layers if isinstance(m, nn.BatchNorm1d)]
    folded = XVectorTDNN(
        model.classifier.out_features,
        n_mels=convs[0].in_channels,
        frame_channels=tuple(c.out_channels for c in convs),
        embedding_dim=model.segment6.out_features,
        batch_norm=False,
    )
    for name in ("segment6", "segment7", "classifier"):
        getattr(folded, name).load_state_dict(getattr(model, name).state_dict())
    targets = [m for m in folded.frame_layers if isinstance(m, nn.Conv1d)]
    with torch.no_grad():
        for i, (conv, target) in enumerate(zip(convs, targets, strict=True)):
            scale, shift = torch.ones_like(conv.bias), torch.zeros_like(conv.bias)
            if norms:
                norm = norms[i]
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                shift = norm.bias - norm.running_mean * scale
            target.weight.copy_(conv.weight * scale[:, None, None])
            target.bias.copy_(conv.bias * scale + shift)
    return folded
