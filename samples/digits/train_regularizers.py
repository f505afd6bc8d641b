"""Sparsity regularizers side by side on scikit-learn digits: DeepHoyer's and bit-slice L1's trends, reproduced small.

    python samples/digits/train_regularizers.py [--only mlp|cnn|bitslice]

mlp       MLP 64-100-10: L1 vs Hoyer-Square (DeepHoyer MNIST recipe: Adam 1e-3, regularize, prune |w| < 1e-3,
          fine-tune with the zeros fixed). Claim: at equal accuracy HS leaves more weights at zero.
cnn       the digits CNN of samples/digits/digits_cnn.py (Conv+BatchNorm): group Lasso vs Group-HS over filters and
          input channels, pruned by group RMS relative to the layer. Claim: at equal accuracy Group-HS zeroes more
          channels. With BatchNorm every layer's scale is free, so group Lasso can lower its penalty by shrinking a
          whole layer instead of removing channels; the scale-invariant Group-HS cannot.
bitslice  MLP with 8-bit DFP quantization-aware training (the paper's pipeline): L1 pretraining, prune |w| < 0.01,
          then fine-tune with plain L1 or bit-slice L1 (SGD 0.01, momentum 0.5). Claim: more zero 2-bit slices.

Every row is one seeded run (split, initialisation and data order fixed; torch on one thread). "matched" lines
compare runs whose test accuracies are within 0.5 points of each other.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from optimizer.training import (
    Masks,
    SparsityRegularizer,
    Term,
    TrainConfig,
    Trainer,
    magnitude_slices,
    prepare_qat,
    threshold_masks,
)
from samples.digits.digits_cnn import load_split, make_model

SEED = 0
MATCH_POINTS = 0.5


@dataclass
class Row:
    method: str
    strength: float
    accuracy: float
    weight_sparsity: float
    zero_channels: int
    channels: int
    zero_slices: float
    slice_zeros: list[float]
    seconds: float


def mlp() -> nn.Sequential:
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))


def cnn() -> nn.Sequential:
    torch.manual_seed(SEED)
    return make_model()


def chain(model: nn.Sequential) -> list[tuple[nn.Module, nn.Module, int]]:
    """(producer, consumer, input columns per channel) for every hidden channel space of a Sequential."""
    layers = [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
    pairs = []
    for producer, consumer in zip(layers[:-1], layers[1:], strict=True):
        block = consumer.weight.shape[1] // producer.weight.shape[0]
        pairs.append((producer, consumer, block))
    return pairs


def dead_channels(model: nn.Sequential) -> tuple[int, int]:
    """Hidden channels whose producer filter or whole consumer input block is zero: removable exactly."""
    dead = total = 0
    for producer, consumer, block in chain(model):
        filters = (producer.weight.detach().flatten(1) == 0).all(1)
        columns = (consumer.weight.detach().transpose(0, 1).flatten(1) == 0).all(1).view(-1, block).all(1)
        dead += int((filters | columns).sum())
        total += producer.weight.shape[0]
    return dead, total


def measure(method: str, strength: float, model: nn.Sequential, trainer: Trainer, test, started: float) -> Row:
    weights = [m.weight for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    slices = [magnitude_slices(w, bits=8, cell_bits=2)[0] for w in weights]
    per_slice = np.sum([(s == 0).reshape(len(s), -1).sum(1) for s in slices], 0) / sum(s[0].size for s in slices)
    overall = sum(int((s == 0).sum()) for s in slices) / sum(s.size for s in slices)
    dead, total = dead_channels(model)
    row = Row(method, strength, trainer.evaluate(test), zeros, dead, total, overall, per_slice.tolist(),
              time.perf_counter() - started)
    print_row(row)
    return row


def print_header() -> None:
    print(f"{'method':<20}{'strength':>9}{'test acc':>10}{'w sparsity':>12}{'zero ch':>10}"
          f"{'zero slices':>13}   zero fraction per slice (LSB..MSB){'time':>10}")


def print_row(r: Row) -> None:
    slices = " ".join(f"{z:.3f}" for z in r.slice_zeros)
    print(f"{r.method:<20}{r.strength:>9g}{100 * r.accuracy:>9.2f}%{100 * r.weight_sparsity:>11.1f}%"
          f"{f'{r.zero_channels}/{r.channels}':>10}{100 * r.zero_slices:>12.1f}%   {slices:<36}{r.seconds:>8.1f}s",
          flush=True)


def matched(rows: list[Row], candidate: str, baseline: str, metric: str, label: str, ratio: bool = False) -> None:
    """For each candidate run, the baseline run of closest accuracy within MATCH_POINTS, metric side by side."""
    ours = [r for r in rows if r.method == candidate]
    theirs = [r for r in rows if r.method == baseline]
    print(f"matched accuracy (within {MATCH_POINTS} pt): {label}")
    for r in ours:
        close = [b for b in theirs if abs(b.accuracy - r.accuracy) * 100 <= MATCH_POINTS]
        if not close:
            print(f"  {candidate} {r.strength:g} ({100 * r.accuracy:.2f}%): no {baseline} run within {MATCH_POINTS} pt")
            continue
        b = min(close, key=lambda b: (abs(b.accuracy - r.accuracy), -getattr(b, metric)))
        mine, other = getattr(r, metric), getattr(b, metric)
        extra = f"  ratio {mine / other:.2f}x" if ratio and other else ""
        print(f"  {candidate} {r.strength:g} ({100 * r.accuracy:.2f}%) {metric} {mine:.3f}  vs  "
              f"{baseline} {b.strength:g} ({100 * b.accuracy:.2f}%) {other:.3f}  -> "
              f"{'higher' if mine > other else 'not higher'}{extra}")


def run_mlp(train, test) -> list[Row]:
    print("\n== MLP 64-100-10: L1 vs Hoyer-Square (Adam 1e-3, 60 epochs, prune |w| < 1e-3, fine-tune 30) ==")
    print_header()
    rows = []
    sweeps = [("none", [0.0]), ("l1", [3e-4, 1e-3, 3e-3, 6e-3]), ("hoyer_square", [3e-4, 1e-3, 3e-3, 6e-3])]
    for kind, strengths in sweeps:
        for strength in strengths:
            started = time.perf_counter()
            model = mlp()
            reg = SparsityRegularizer(model, Term(kind, strength)) if kind != "none" else None
            trainer = Trainer(model, TrainConfig(epochs=60, lr=1e-3, progress=False, seed=SEED), regularizer=reg)
            trainer.fit(train)
            trainer.threshold_then_finetune(train, threshold=1e-3, finetune=TrainConfig(epochs=30, lr=1e-3,
                                                                                         progress=False, seed=SEED))
            rows.append(measure(kind, strength, model, trainer, test, started))
    matched(rows, "hoyer_square", "l1", "weight_sparsity", "weight sparsity, Hoyer-Square vs L1")
    return rows


def cnn_terms(kind: str, strength: float) -> list[Term]:
    """Filters of every layer but the logits, input channels of every layer but the image's: per-group terms."""
    return [
        Term(kind, strength, name=r"^0$", groups=("filter",)),
        Term(kind, strength, name=r"^(3|7|11)$", groups=("filter", "channel")),
        Term(kind, strength, name=r"^13$", groups=("channel",)),
    ]


def run_cnn(train, test) -> list[Row]:
    print("\n== digits CNN (Conv+BN): group Lasso vs Group-HS (Adam 3e-3 cosine, 20 epochs, prune groups with "
          "RMS < 0.2 x layer RMS, fine-tune 4) ==")
    print_header()
    rows = []
    sweeps = [("none", [0.0]), ("group_lasso", [1e-2, 3e-2, 5e-2, 6e-2, 7e-2]),
              ("group_hoyer_square", [3e-2, 1e-1, 3e-1, 3.0])]
    for kind, strengths in sweeps:
        for strength in strengths:
            started = time.perf_counter()
            model = cnn()
            reg = SparsityRegularizer(model, cnn_terms(kind, strength)) if kind != "none" else None
            config = TrainConfig(epochs=20, lr=3e-3, schedule="cosine", progress=False, seed=SEED)
            trainer = Trainer(model, config, regularizer=reg)
            trainer.fit(train)
            trainer.threshold_then_finetune(train, std_ratio=0.2, groups=("filter", "channel"),
                                            finetune=TrainConfig(epochs=4, lr=3e-3, schedule="cosine",
                                                                 progress=False, seed=SEED))
            rows.append(measure(kind, strength, model, trainer, test, started))
    matched(rows, "group_hoyer_square", "group_lasso", "zero_channels", "all-zero channels, Group-HS vs group Lasso")
    return rows


def run_bitslice(train, test) -> list[Row]:
    print("\n== MLP, 8-bit DFP QAT: plain L1 vs bit-slice L1 fine-tuning (after L1 pretraining and |w| < 0.01 "
          "pruning; SGD 0.01 momentum 0.5, 20 epochs) ==")
    started = time.perf_counter()
    base = prepare_qat(mlp())
    pretrain = SparsityRegularizer(base, Term("l1", 1e-4))
    Trainer(base, TrainConfig(epochs=30, lr=1e-3, progress=False, seed=SEED), regularizer=pretrain).fit(train)
    threshold_masks(pretrain.layers.values(), threshold=1e-2)
    print_header()
    rows = [measure("pretrained+pruned", 0.0, base, Trainer(base, TrainConfig(progress=False)), test, started)]
    for kind, strengths in [("l1", [1.0, 10.0, 30.0]), ("bitslice_l1", [0.1, 0.2, 0.3])]:
        for strength in strengths:
            started = time.perf_counter()
            model = copy.deepcopy(base)
            reg = SparsityRegularizer(model, Term(kind, strength, per_weight=True))
            config = TrainConfig(epochs=20, optimizer="sgd", lr=0.01, momentum=0.5, progress=False, seed=SEED)
            trainer = Trainer(model, config, regularizer=reg)
            trainer.masks = Masks([(f"{n}.weight", layer.weight, (layer.weight != 0).to(layer.weight.dtype))
                                   for n, layer in reg.layers.items()]).attach()
            trainer.fit(train)
            rows.append(measure(kind, strength, model, trainer, test, started))
    matched(rows, "bitslice_l1", "l1", "zero_slices", "fraction of zero 2-bit slices, bit-slice L1 vs L1", ratio=True)
    print("  (the same pairs as nonzero slices: what the crossbar must store and the ADCs must resolve)")
    for r in [r for r in rows if r.method == "bitslice_l1"]:
        close = [b for b in rows if b.method == "l1" and abs(b.accuracy - r.accuracy) * 100 <= MATCH_POINTS]
        if close:
            b = min(close, key=lambda b: (abs(b.accuracy - r.accuracy), b.zero_slices))
            print(f"  bitslice_l1 {r.strength:g}: nonzero slices {1 - r.zero_slices:.3f} vs l1 {b.strength:g}: "
                  f"{1 - b.zero_slices:.3f} -> {(1 - b.zero_slices) / (1 - r.zero_slices):.2f}x fewer")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["mlp", "cnn", "bitslice"], help="run one experiment")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x_train, x_test, y_train, y_test = load_split(SEED)
    flat = ((x_train.reshape(len(x_train), -1), y_train), (x_test.reshape(len(x_test), -1), y_test))
    if args.only in (None, "mlp"):
        run_mlp(*flat)
    if args.only in (None, "cnn"):
        run_cnn((x_train, y_train), (x_test, y_test))
    if args.only in (None, "bitslice"):
        run_bitslice(*flat)


if __name__ == "__main__":
    main()
