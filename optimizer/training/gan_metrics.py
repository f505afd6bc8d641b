"""Measuring a class-conditional generator with a classifier trained on real data (never on generated data).

    judge = Judge.from_sequential(classifier)         # features = every layer but the last, head = the last
    real = judge.features(x_test)
    metrics = generation_metrics(judge, images, requested_labels, x_test, y_test)
    metrics.accuracy, metrics.fid, metrics.diversity

  accuracy    the fraction of generated images the classifier assigns to the class they were generated for.
  fid         the Fréchet distance between Gaussians fitted to the classifier's penultimate features of the generated
              images and of the reference (real test) images: |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))
              (an FID with the digits classifier in place of Inception; not comparable to Inception FIDs).
  diversity   per class, the mean pairwise L2 distance between the features of generated images of that class
              divided by the same for the real reference images of that class; the mean over classes. 1 is as
              diverse as real data, below 1 less (0 is mode collapse).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from optimizer.errors import UsageError


class Judge:
    """A frozen classifier split into `features` (images -> penultimate features) and `head` (features -> logits)."""

    def __init__(self, features: nn.Module, head: nn.Module):
        self.feature_net, self.head = features.eval(), head.eval()

    @classmethod
    def from_sequential(cls, model: nn.Sequential) -> Judge:
        """The last module of `model` is the head; everything before it computes the features."""
        if not isinstance(model, nn.Sequential) or len(model) < 2:
            raise UsageError("Judge.from_sequential: the classifier must be an nn.Sequential of at least two modules")
        return cls(model[:-1], model[-1])

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
        return torch.cat([self.feature_net(images[s:s + batch_size])
                          for s in range(0, len(images), batch_size)]).double().numpy()

    @torch.no_grad()
    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.head(torch.from_numpy(features).float()).argmax(1).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance between Gaussians fitted to the rows of a and b (float64, scipy's sqrtm; the tiny
    imaginary part sqrtm can return for a nearly singular product is dropped).

    Example: a ~ N(0, 1), b ~ N(3, 4) in one dimension -> (0 - 3)^2 + (1 - 2)^2 = 10 (for many samples).
    """
    from scipy import linalg

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise UsageError(f"frechet_distance: need two [N >= 2, D] arrays of the same D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        # ReLU features that are zero on every image make both covariances singular; sqrtm still returns the root
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_a @ cov_b)
    root = root.real if np.iscomplexobj(root) else root
    return float(max(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root), 0.0))


def mean_pairwise_distance(features: np.ndarray) -> float:
    """The mean L2 distance over all unordered pairs of rows (nan for fewer than two rows)."""
    if len(features) < 2:
        return float("nan")
    squares = (features ** 2).sum(1)
    gram = squares[:, None] + squares[None, :] - 2 * features @ features.T
    distances = np.sqrt(np.clip(gram, 0, None))
    upper = np.triu_indices(len(features), k=1)
    return float(distances[upper].mean())


def diversity_ratio(features: np.ndarray, labels: np.ndarray, reference: np.ndarray,
                    reference_labels: np.ndarray) -> float:
    """Mean over the classes present in both of mean_pairwise_distance(generated) / mean_pairwise_distance(real)."""
    ratios = []
    for label in np.intersect1d(np.unique(labels), np.unique(reference_labels)):
        real = mean_pairwise_distance(reference[reference_labels == label])
        ratios.append(mean_pairwise_distance(features[labels == label]) / real)
    return float(np.nanmean(ratios)) if ratios else float("nan")


@dataclass(frozen=True)
class GenerationMetrics:
    accuracy: float
    fid: float
    diversity: float

    def as_dict(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "fid": self.fid, "diversity": self.diversity}


def generation_metrics(judge: Judge, images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor,
                       reference_labels: torch.Tensor) -> GenerationMetrics:
    """Class-conditional accuracy, FID and diversity of `images` generated for `labels`, against real `reference`
    images (module docstring). Real images in place of generated ones measure the metrics' own floor."""
    if len(images) != len(labels):
        raise UsageError(f"generation_metrics: {len(images)} images but {len(labels)} labels")
    features, real = judge.features(images), judge.features(reference)
    labels, reference_labels = np.asarray(labels), np.asarray(reference_labels)
    accuracy = float((judge.predict(features) == labels).mean())
    return GenerationMetrics(accuracy, frechet_distance(features, real),
                             diversity_ratio(features, labels, real, reference_labels))
