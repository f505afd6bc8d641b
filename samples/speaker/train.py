"""Train the x-vector TDNN twice over: a dense baseline, and from it a structurally sparse model.

The dense model trains with BatchNorm (fast, stable convergence). The sparse model follows SSL / DeepHoyer with
the `optimizer.training` frontend: fold the BatchNorms into the convolutions (under BatchNorm a filter's scale
is free, so a weight penalty could not switch a channel off), continue training with group Lasso (or Group-HS)
on the frame layers' filters and input channels and on the first segment layer's input channels, zero the
groups whose RMS falls below a fraction of their layer's (`SparsityRegularizer.threshold_masks`), and fine-tune
with those zeros held fixed. A zeroed filter takes its bias with it, so its channel outputs exactly zero and
`structured-sparse:criterion=zero` can remove it.

Checkpoints are cached under samples/speaker/generated/, keyed by the corpus and the training plan.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from torch.utils.data import Dataset

from optimizer.training import (
    SparsityRegularizer,
    Term,
    TrainConfig,
    Trainer,
    export,
    seed_everything,
)
from samples.speaker.corpus import GENERATED_DIR, Corpus, CorpusConfig
from samples.speaker.features import N_MELS
from samples.speaker.model import DEFAULT_FRAME_CHANNELS, EmbeddingExtractor, XVectorTDNN, fold_batch_norm

TRAIN_VERSION = 1
FRAME_LAYERS = r"^frame_layers\."
SEGMENT_LAYER = r"^segment6$"


@dataclass(frozen=True)
class TrainingPlan:
    """Everything that decides the trained weights (with the corpus). Epochs are passes over the chunked set."""

    seed: int = 0
    frame_channels: tuple[int, ...] = DEFAULT_FRAME_CHANNELS
    embedding_dim: int = 128
    batch_norm: bool = True
    chunk_frames: int = 100
    batch_size: int = 64
    dense_epochs: int = 14
    dense_lr: float = 3e-3
    regularizer: Literal["group_lasso", "group_hoyer_square"] = "group_lasso"
    regularizer_weight: float = 1e-2
    segment_regularizer_weight: float = 1e-2
    sparse_epochs: int = 8
    sparse_lr: float = 3e-3
    threshold_std_ratio: float = 0.1
    finetune_epochs: int = 12
    finetune_lr: float = 1e-3

    def digest(self, corpus: CorpusConfig) -> str:
        text = json.dumps({"version": TRAIN_VERSION, "plan": asdict(self), "corpus": corpus.digest()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


class RandomChunks(Dataset):
    """Random `chunk_frames`-long crops of the training utterances; `crops_per_utterance` crops make an epoch.

    Offsets come from torch's global generator, which the trainer seeds at the start of every fit.
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray, chunk_frames: int, crops_per_utterance: int = 3):
        if features.shape[2] < chunk_frames:
            raise ValueError(f"utterances of {features.shape[2]} frames are shorter than chunks of {chunk_frames}")
        self.features = torch.from_numpy(features)
        self.labels = torch.from_numpy(labels)
        self.chunk_frames = chunk_frames
        self.crops = crops_per_utterance

    def __len__(self) -> int:
        return len(self.labels) * self.crops

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        utterance = index % len(self.labels)
        start = int(torch.randint(0, self.features.shape[2] - self.chunk_frames + 1, ()))
        return self.features[utterance, :, start : start + self.chunk_frames], self.labels[utterance]


def new_model(plan: TrainingPlan, n_speakers: int) -> XVectorTDNN:
    seed_everything(plan.seed)
    return XVectorTDNN(
        n_speakers, frame_channels=plan.frame_channels, embedding_dim=plan.embedding_dim, batch_norm=plan.batch_norm
    )


def sparsity_regularizer(model: XVectorTDNN, plan: TrainingPlan) -> SparsityRegularizer:
    """Filters and input channels of the frame layers; input channels only of segment6, whose filters are the
    embedding (a graph output, which no pass may shrink)."""
    return SparsityRegularizer(
        model,
        [
            Term(plan.regularizer, plan.regularizer_weight, name=FRAME_LAYERS, groups=("filter", "channel")),
            Term(plan.regularizer, plan.segment_regularizer_weight, name=SEGMENT_LAYER, groups=("channel",)),
        ],
    )


def train_dense(corpus: Corpus, plan: TrainingPlan) -> XVectorTDNN:
    model = new_model(plan, int(corpus.train_labels.max()) + 1)
    config = TrainConfig(
        epochs=plan.dense_epochs, batch_size=plan.batch_size, lr=plan.dense_lr, schedule="cosine", seed=plan.seed
    )
    Trainer(model, config).fit(RandomChunks(corpus.train_features, corpus.train_labels, plan.chunk_frames))
    return model


def train_sparse(dense: XVectorTDNN, corpus: Corpus, plan: TrainingPlan) -> tuple[XVectorTDNN, SparsityRegularizer]:
    """From the dense weights (BatchNorm folded away): regularize, zero the weak groups, fine-tune with the
    zeros held fixed."""
    model = fold_batch_norm(dense)
    regularizer = sparsity_regularizer(model, plan)
    data = RandomChunks(corpus.train_features, corpus.train_labels, plan.chunk_frames)
    config = TrainConfig(epochs=plan.sparse_epochs, batch_size=plan.batch_size, lr=plan.sparse_lr, seed=plan.seed)
    trainer = Trainer(model, config, regularizer=regularizer)
    trainer.fit(data)
    # the frame layers lose weak filters and input channels, segment6 only input channels (its filters are the
    # embedding's dimensions): each layer is thresholded over the groups its terms regularize
    trainer.masks = regularizer.threshold_masks(std_ratio=plan.threshold_std_ratio).attach()
    finetune = TrainConfig(
        epochs=plan.finetune_epochs,
        batch_size=plan.batch_size,
        lr=plan.finetune_lr,
        schedule="cosine",
        regularizer_weight=0.0,
        seed=plan.seed + 1,
    )
    trainer.fit(data, config=finetune)
    trainer.masks.detach()
    return model, regularizer


def export_embedding(
    model: XVectorTDNN, path: Path, n_frames: int, regularizer: SparsityRegularizer | None = None
) -> onnx.ModelProto:
    """The deployed graph: features [batch, N_MELS, n_frames] -> embedding [batch, embedding_dim]."""
    return export(
        EmbeddingExtractor(model),
        torch.zeros(1, N_MELS, n_frames),
        path,
        regularizer=regularizer,
        input_names=["features"],
        output_names=["embedding"],
        dynamic_batch=True,
    )


@dataclass(frozen=True)
class TrainedModels:
    dense: XVectorTDNN
    sparse: XVectorTDNN
    regularizer: SparsityRegularizer
    from_cache: bool


def _load(path: Path, model: XVectorTDNN) -> XVectorTDNN:
    model.load_state_dict(torch.load(path, weights_only=True))
    return model


def train_or_load(
    corpus: Corpus, corpus_config: CorpusConfig, plan: TrainingPlan, directory: Path = GENERATED_DIR
) -> TrainedModels:
    """Both models, from the checkpoint cache when it holds this (corpus, plan), else trained and cached."""
    key = plan.digest(corpus_config)
    dense_path, sparse_path = directory / f"dense-{key}.pt", directory / f"sparse-{key}.pt"
    n_speakers = int(corpus.train_labels.max()) + 1
    if dense_path.exists() and sparse_path.exists():
        dense = _load(dense_path, new_model(plan, n_speakers))
        sparse = _load(sparse_path, fold_batch_norm(new_model(plan, n_speakers)))
        return TrainedModels(dense, sparse, sparsity_regularizer(sparse, plan), True)
    dense = train_dense(corpus, plan)
    sparse, regularizer = train_sparse(dense, corpus, plan)
    directory.mkdir(parents=True, exist_ok=True)
    for model, path in ((dense, dense_path), (sparse, sparse_path)):
        partial = path.with_suffix(".partial")
        torch.save(model.state_dict(), partial)
        partial.replace(path)
    return TrainedModels(dense, sparse, regularizer, False)
