"""A small supervised trainer: regularized training, threshold-then-finetune with fixed masks, torchrun/DDP.

    trainer = Trainer(model, TrainConfig(epochs=20, lr=1e-3), regularizer=reg)
    trainer.fit((x_train, y_train), eval_data=(x_test, y_test))
    trainer.threshold_then_finetune((x_train, y_train), std_ratio=0.25, finetune=TrainConfig(epochs=5))

The same script runs under `torchrun --nproc_per_node=N`: the trainer joins the process group (gloo on CPU,
nccl on GPU), wraps the model in DistributedDataParallel and shards every epoch with a DistributedSampler.
`batch_size` is the global batch; each process takes batch_size / N of it. The data order is the sampler's
seeded permutation whatever N is, so with equal shards (len(data) divisible by batch_size) a model without
BatchNorm follows the same trajectory on 1 or N processes, up to float summation order.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from optimizer.errors import UsageError
from optimizer.training.masks import Masks, batchnorm_map, select_layers, threshold_masks
from optimizer.training.regularizers import SparsityRegularizer

Data = Dataset | Sequence[torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """epochs; batch_size (global); optimizer adam|sgd with lr, momentum (sgd), weight_decay; schedule
    constant|cosine|step (step: lr × gamma every step_epochs); regularizer_weight multiplies the regularizer
    (0 switches it off); seed fixes data order, dropout and initial state of every random choice in training."""

    epochs: int = 10
    batch_size: int = 64
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine", "step"] = "constant"
    step_epochs: int = 30
    gamma: float = 0.1
    regularizer_weight: float = 1.0
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise UsageError(f"TrainConfig: epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr} "
                             "must be >= 0, >= 1 and > 0")
        if self.optimizer not in ("adam", "sgd") or self.schedule not in ("constant", "cosine", "step"):
            raise UsageError(f"TrainConfig: optimizer={self.optimizer!r} (adam|sgd), "
                             f"schedule={self.schedule!r} (constant|cosine|step)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def join_process_group(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the group) from torchrun's environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    return dist.get_rank(), dist.get_world_size(), created


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `config` names, over model's trainable parameters: what Trainer.fit builds when it is given
    none. Build it once and pass it to every fit (fit(optimizer=...)) to keep its state across calls."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


BatchTransform = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


class Trainer:
    """Trains `model` on (input, target) pairs with `loss(model(input), target)` + weight · regularizer()."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig | None = None,
        *,
        regularizer: SparsityRegularizer | None = None,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        device: str | torch.device | None = None,
    ):
        self.config = config or TrainConfig()
        self.config.validate()
        self.regularizer = regularizer
        self.loss = loss
        self.device = torch.device(device or "cpu")
        if self.device.type == "cuda" and "LOCAL_RANK" in os.environ:
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        self.rank, self.world, self._owns_group = join_process_group(self.device)
        self.model = model.to(self.device)
        self.network: nn.Module = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.masks: Masks | None = None
        self.history: list[dict] = []

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def fit(self, train: Data, eval_data: Data | None = None, *, config: TrainConfig | None = None,
            optimizer: torch.optim.Optimizer | None = None, transform: BatchTransform | None = None) -> list[dict]:
        """Train for config.epochs; returns one record per epoch (loss, penalty, lr, accuracies).

        optimizer: step this one instead of a fresh one built from the config, so its state (momentum) carries
        across calls; the config's schedule still applies to its lr.
        transform(inputs, targets, epoch) -> (inputs, targets) rewrites every batch before the forward pass
        (e.g. stamping backdoor triggers on part of it).
        """
        config = config or self.config
        config.validate()
        if config.batch_size % self.world:
            raise UsageError(f"batch_size={config.batch_size} does not split over {self.world} processes")
        seed_everything(config.seed)
        dataset = _as_dataset(train)
        sampler = DistributedSampler(dataset, num_replicas=self.world, rank=self.rank, shuffle=True, seed=config.seed)
        loader = _Batches(dataset, sampler, config.batch_size // self.world)
        optimizer = optimizer if optimizer is not None else self._optimizer(config)
        schedule = self._schedule(optimizer, config)
        regularize = self.regularizer is not None and config.regularizer_weight != 0
        records = []
        with _progress(config.progress and self.is_main, config.epochs * len(loader)) as advance:
            for epoch in range(config.epochs):
                sampler.set_epoch(epoch)
                self.network.train()
                totals = torch.zeros(3, dtype=torch.float64)
                for inputs, targets in loader:
                    if transform is not None:
                        inputs, targets = transform(inputs, targets, epoch)
                    inputs, targets = inputs.to(self.device), targets.to(self.device)
                    optimizer.zero_grad(set_to_none=True)
                    data_loss = self.loss(self.network(inputs), targets)
                    penalty = self.regularizer() if regularize else torch.zeros((), device=self.device)
                    (data_loss + config.regularizer_weight * penalty).backward()
                    optimizer.step()
                    if self.masks is not None:
                        self.masks.apply()
                    batch_loss = float(data_loss.detach())
                    totals += torch.tensor([batch_loss * len(targets), float(penalty.detach()), len(targets)],
                                           dtype=torch.float64)
                    advance(f"epoch {epoch + 1}/{config.epochs} loss {batch_loss:.4f}")
                lr = optimizer.param_groups[0]["lr"]
                schedule.step()
                record = self._epoch_record(epoch, totals, len(loader), lr, eval_data)
                records.append(record)
        self.history.extend(records)
        return records

    def threshold_then_finetune(
        self,
        train: Data,
        eval_data: Data | None = None,
        *,
        threshold: float | None = None,
        std_ratio: float | None = None,
        groups: Sequence[str] | Literal["regularized"] = ("element",),
        finetune: TrainConfig | None = None,
        regularize_finetune: bool = False,
    ) -> Masks:
        """Zero small weights or groups (masks.threshold_masks), then fine-tune with those zeros held fixed.

        The layers are the regularizer's, or every Linear/ConvNd when there is none. groups="regularized"
        thresholds each layer over the groups its regularizer terms name (SparsityRegularizer.threshold_masks),
        so a term over input channels only never zeroes that layer's filters. `finetune` defaults to the
        trainer's config; fine-tuning runs without the regularizer (as DeepHoyer's and SSL's do) unless
        regularize_finetune is set.
        """
        if self.masks is not None:
            self.masks.detach()
        if groups == "regularized":
            if self.regularizer is None:
                raise UsageError('threshold_then_finetune: groups="regularized" needs a trainer with a regularizer')
            masks = self.regularizer.threshold_masks(threshold=threshold, std_ratio=std_ratio)
        else:
            layers = list(self.regularizer.layers.values()) if self.regularizer is not None else select_layers(
                self.model, norms=batchnorm_map(self.model)
            )
            masks = threshold_masks(layers, threshold=threshold, std_ratio=std_ratio, groups=groups)
        self.masks = masks.attach()
        config = finetune or self.config
        self.fit(train, eval_data, config=config if regularize_finetune else replace(config, regularizer_weight=0.0))
        return self.masks

    @torch.no_grad()
    def evaluate(self, data: Data, batch_size: int = 512) -> float:
        """Top-1 accuracy (argmax over axis 1) over all of `data`, summed across processes."""
        dataset = _as_dataset(data)
        indices = list(range(self.rank, len(dataset), self.world))
        was_training = self.model.training
        self.model.eval()
        counts = torch.zeros(2, dtype=torch.float64)
        for start in range(0, len(indices), batch_size):
            inputs, targets = zip(*(dataset[i] for i in indices[start:start + batch_size]), strict=True)
            outputs = self.model(torch.stack(inputs).to(self.device))
            counts += torch.tensor([float((outputs.argmax(1).cpu() == torch.stack(targets)).sum()), len(targets)],
                                   dtype=torch.float64)
        self.model.train(was_training)
        if self.world > 1:
            dist.all_reduce(counts)
        return float(counts[0] / counts[1]) if counts[1] else float("nan")

    def close(self) -> None:
        """Leave the process group if this trainer created it (end of a torchrun script)."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    def _epoch_record(self, epoch, totals, batches, lr, eval_data) -> dict:
        if self.world > 1:
            dist.all_reduce(totals)
            totals[1] /= self.world
        record = {"epoch": epoch + 1, "loss": float(totals[0] / max(totals[2], 1)),
                  "penalty": float(totals[1] / max(batches, 1)), "lr": lr}
        if eval_data is not None:
            record["eval_accuracy"] = self.evaluate(eval_data)
        return record

    def _optimizer(self, config: TrainConfig) -> torch.optim.Optimizer:
        return build_optimizer(self.model, config)

    @staticmethod
    def _schedule(optimizer: torch.optim.Optimizer, config: TrainConfig):
        if config.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))
        if config.schedule == "step":
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_epochs, gamma=config.gamma)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _as_dataset(data: Data) -> Dataset:
    if isinstance(data, Dataset):
        return data
    tensors = [torch.as_tensor(t) for t in data]
    if len(tensors) != 2 or len(tensors[0]) != len(tensors[1]):
        raise UsageError("training data must be a Dataset or (inputs, targets) of equal length")
    return TensorDataset(*tensors)


class _Batches:
    """The batches a DataLoader(dataset, batch_size, sampler=sampler) yields; tensor datasets are sliced whole
    (per-sample indexing and collation cost more than the training step of a small model)."""

    def __init__(self, dataset: Dataset, sampler: DistributedSampler, batch_size: int):
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        if not isinstance(self.dataset, TensorDataset):
            yield from DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler)
            return
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        for batch in order.split(self.batch_size):
            yield tuple(t[batch] for t in self.dataset.tensors)


class _progress:
    """A rich progress bar on the main process; a no-op elsewhere or when disabled."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self) -> Callable[[str], None]:
        if not self.enabled:
            return lambda _description: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            transient=True)
        self.bar.__enter__()
        task = self.bar.add_task("training", total=self.total)
        return lambda description: self.bar.update(task, advance=1, description=description)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)
