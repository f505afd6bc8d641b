"""Sparsity regularizers side by side on scikit-learn digits: DeepHoyer's and bit-slice L1's trends, reproduced small.

    python -m samples.digits.train_regularizers [--only mlp|cnn|bitslice] [--seeds 3]

mlp       MLP 64-100-10: L1 vs Hoyer-Square (DeepHoyer MNIST recipe: Adam 1e-3, regularize, prune |w| < 1e-3,
          fine-tune with the zeros fixed). Claim: at equal accuracy HS leaves more weights at zero.
cnn       the digits CNN of samples/digits/digits_cnn.py (Conv+BatchNorm): group Lasso vs Group-HS over filters and
          input channels, pruned by group RMS relative to the layer. Claim: at equal accuracy Group-HS zeroes more
          channels. With BatchNorm every layer's scale is free, so group Lasso can lower its penalty by shrinking a
          whole layer instead of removing channels; the scale-invariant Group-HS cannot.
bitslice  MLP with 8-bit DFP quantization-aware training, fine-tuned from one dense QAT model with plain L1 or
          bit-slice L1 (the paper's SGD 0.01, momentum 0.5). Claim: more zero 2-bit slices. The paper also prunes
          |w| < 0.01 after an L1 pretraining; that is left out here because the pruned weights' slices are zero for
          both methods alike and only push both fractions towards 1.

Each row is the mean over --seeds training runs (initialisation and data order vary with the seed; the
train/test split is fixed; torch on one thread). "matched" lines compare each candidate row with the baseline's
best row among those whose mean test accuracy is within 0.5 points: the strictest reading of "equal accuracy".
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
    SparsityRegularizer,
    Term,
    TrainConfig,
    Trainer,
    magnitude_slices,
    prepare_qat,
)
from samples.digits.digits_cnn import load_split, make_model

SEED = 0
MATCH_POINTS = 0.5
WEIGHT_BITS, CELL_BITS = 8, 2  # int8 weights (sign + 7-bit magnitude) on 2-bit ReRAM cells


@dataclass
class Row:
    method: str
    strength: float
    accuracy: float
    weight_sparsity: float
    zero_channels: float
    channels: int
    zero_slices: float
    zero_2bit_slices: float
    slice_zeros: list[float]
    seconds: float


def mlp(seed: int = SEED) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))


def cnn(seed: int = SEED) -> nn.Sequential:
    torch.manual_seed(seed)
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


def measure(method: str, strength: float, model: nn.Sequential, trainer: Trainer, test) -> Row:
    weights = [m.weight for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    slices = [magnitude_slices(w, bits=WEIGHT_BITS, cell_bits=CELL_BITS)[0] for w in weights]
    per_slice = np.sum([(s == 0).reshape(len(s), -1).sum(1) for s in slices], 0) / sum(s[0].size for s in slices)
    # the sign takes one bit; the top cell of a 7-bit magnitude in 2-bit cells holds a single bit
    cell_widths = np.minimum(CELL_BITS, WEIGHT_BITS - 1 - CELL_BITS * np.arange(len(per_slice)))
    dead, total = dead_channels(model)
    return Row(method, strength, trainer.evaluate(test), zeros, dead, total, float(per_slice.mean()),
               float(per_slice[cell_widths == CELL_BITS].mean()), per_slice.tolist(), 0.0)


def mean_row(runs: list[Row], seconds: float) -> Row:
    """One row averaging the seeds' runs of a (method, strength)."""
    first = runs[0]
    mean = {f: float(np.mean([getattr(r, f) for r in runs]))
            for f in ("accuracy", "weight_sparsity", "zero_channels", "zero_slices", "zero_2bit_slices")}
    return Row(first.method, first.strength, channels=first.channels, seconds=seconds,
               slice_zeros=np.mean([r.slice_zeros for r in runs], axis=0).tolist(), **mean)


def sweep(sweeps: list[tuple[str, list[float]]], train_one, test, seeds: list[int]) -> list[Row]:
    """train_one(kind, strength, seed) -> (model, trainer) for every point of every sweep; one printed row each."""
    print_header()
    rows = []
    for kind, strengths in sweeps:
        for strength in strengths:
            started = time.perf_counter()
            runs = [measure(kind, strength, *train_one(kind, strength, seed), test) for seed in seeds]
            rows.append(mean_row(runs, time.perf_counter() - started))
            print_row(rows[-1])
    return rows


def print_header() -> None:
    print(f"{'method':<20}{'strength':>9}{'test acc':>10}{'w sparsity':>12}{'zero ch':>10}"
          f"{'zero slices':>13}{'2-bit':>8}   zero fraction per slice (LSB..MSB){'time':>10}")


def print_row(r: Row) -> None:
    slices = " ".join(f"{z:.3f}" for z in r.slice_zeros)
    channels = f"{r.zero_channels:.1f}/{r.channels}"
    print(f"{r.method:<20}{r.strength:>9g}{100 * r.accuracy:>9.2f}%{100 * r.weight_sparsity:>11.1f}%{channels:>10}"
          f"{100 * r.zero_slices:>12.1f}%{100 * r.zero_2bit_slices:>7.1f}%   {slices:<36}{r.seconds:>8.1f}s",
          flush=True)


def closest(rows: list[Row], r: Row, baseline: str, metric: str) -> Row | None:
    """The baseline run within MATCH_POINTS of r's accuracy that scores best on metric: the strictest comparison."""
    close = [b for b in rows if b.method == baseline and abs(b.accuracy - r.accuracy) * 100 <= MATCH_POINTS]
    return max(close, key=lambda b: getattr(b, metric), default=None)


def matched(rows: list[Row], candidate: str, baseline: str, metric: str, label: str, ratio: bool = False) -> None:
    """Each candidate run against the best baseline run of equal accuracy (within MATCH_POINTS), metric side by side."""
    print(f"matched accuracy (within {MATCH_POINTS} pt, the baseline's best run there): {label}")
    for r in [r for r in rows if r.method == candidate]:
        b = closest(rows, r, baseline, metric)
        if b is None:
            print(f"  {candidate} {r.strength:g} ({100 * r.accuracy:.2f}%): no {baseline} run within {MATCH_POINTS} pt")
            continue
        mine, other = getattr(r, metric), getattr(b, metric)
        extra = f"  ratio {mine / other:.2f}x" if ratio and other else ""
        print(f"  {candidate} {r.strength:g} ({100 * r.accuracy:.2f}%) {metric} {mine:.3f}  vs  "
              f"{baseline} {b.strength:g} ({100 * b.accuracy:.2f}%) {other:.3f}  -> "
              f"{'higher' if mine > other else 'not higher'}{extra}")


def run_mlp(train, test, seeds: list[int]) -> list[Row]:
    print("\n== MLP 64-100-10: L1 vs Hoyer-Square (Adam 1e-3, 60 epochs, prune |w| < 1e-3, fine-tune 30) ==")

    def train_one(kind: str, strength: float, seed: int):
        model = mlp(seed)
        reg = SparsityRegularizer(model, Term(kind, strength)) if kind != "none" else None
        trainer = Trainer(model, TrainConfig(epochs=60, lr=1e-3, progress=False, seed=seed), regularizer=reg)
        trainer.fit(train)
        trainer.threshold_then_finetune(train, threshold=1e-3,
                                        finetune=TrainConfig(epochs=30, lr=1e-3, progress=False, seed=seed))
        return model, trainer

    strengths = [3e-4, 5e-4, 1e-3, 2e-3, 3e-3, 6e-3]
    rows = sweep([("none", [0.0]), ("l1", strengths), ("hoyer_square", strengths)], train_one, test, seeds)
    matched(rows, "hoyer_square", "l1", "weight_sparsity", "weight sparsity, Hoyer-Square vs L1")
    return rows


def cnn_terms(kind: str, strength: float) -> list[Term]:
    """Filters of every layer but the logits, input channels of every layer but the image's: per-group terms."""
    return [
        Term(kind, strength, name=r"^0$", groups=("filter",)),
        Term(kind, strength, name=r"^(3|7|11)$", groups=("filter", "channel")),
        Term(kind, strength, name=r"^13$", groups=("channel",)),
    ]


def run_cnn(train, test, seeds: list[int]) -> list[Row]:
    print("\n== digits CNN (Conv+BN): group Lasso vs Group-HS (Adam 3e-3 cosine, 20 epochs, prune groups with "
          "RMS < 0.2 x layer RMS, fine-tune 4) ==")

    def train_one(kind: str, strength: float, seed: int):
        model = cnn(seed)
        reg = SparsityRegularizer(model, cnn_terms(kind, strength)) if kind != "none" else None
        trainer = Trainer(model, TrainConfig(epochs=20, lr=3e-3, schedule="cosine", progress=False, seed=seed),
                          regularizer=reg)
        trainer.fit(train)
        trainer.threshold_then_finetune(train, std_ratio=0.2, groups=("filter", "channel"),
                                        finetune=TrainConfig(epochs=4, lr=3e-3, schedule="cosine", progress=False,
                                                             seed=seed))
        return model, trainer

    sweeps = [("none", [0.0]), ("group_lasso", [1e-2, 3e-2, 5e-2, 6e-2, 6.5e-2, 7e-2]),
              ("group_hoyer_square", [3e-2, 5e-2, 1e-1, 3e-1, 3.0])]
    rows = sweep(sweeps, train_one, test, seeds)
    matched(rows, "group_hoyer_square", "group_lasso", "zero_channels", "all-zero channels, Group-HS vs group Lasso")
    return rows


def run_bitslice(train, test, seeds: list[int]) -> list[Row]:
    print("\n== MLP, 8-bit DFP QAT (sign + 7-bit magnitude in 2-bit cells: slices of 2, 2, 2 and 1 bits): plain L1 vs "
          "bit-slice L1 fine-tuning of one dense QAT model (Adam 1e-3 100 epochs; fine-tune SGD 0.01 momentum 0.5, "
          "100 epochs) ==")
    bases = {}

    def dense_qat(seed: int) -> nn.Sequential:
        if seed not in bases:
            bases[seed] = prepare_qat(mlp(seed))
            Trainer(bases[seed], TrainConfig(epochs=100, lr=1e-3, progress=False, seed=seed)).fit(train)
        return bases[seed]

    def train_one(kind: str, strength: float, seed: int):
        model = copy.deepcopy(dense_qat(seed))
        reg = SparsityRegularizer(model, Term(kind, strength, per_weight=True)) if kind != "none" else None
        config = TrainConfig(epochs=100, optimizer="sgd", lr=0.01, momentum=0.5, progress=False, seed=seed)
        trainer = Trainer(model, config, regularizer=reg)
        if reg is not None:
            trainer.fit(train)
        return model, trainer

    sweeps = [("none", [0.0]), ("l1", [1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0]),
              ("bitslice_l1", [0.05, 0.1, 0.15, 0.3, 0.5, 0.7, 1.0])]
    rows = sweep(sweeps, train_one, test, seeds)
    matched(rows, "bitslice_l1", "l1", "zero_slices", "fraction of zero slices (all four), bit-slice L1 vs L1",
            ratio=True)
    matched(rows, "bitslice_l1", "l1", "zero_2bit_slices", "fraction of zero 2-bit slices (the three full cells), "
            "bit-slice L1 vs L1", ratio=True)
    print("  the same pairs as nonzero slices (what the crossbar stores and its ADCs must resolve):")
    for r in [r for r in rows if r.method == "bitslice_l1"]:
        b = closest(rows, r, "l1", "zero_slices")
        if b is not None:
            print(f"  bitslice_l1 {r.strength:g}: nonzero slices {1 - r.zero_slices:.3f} vs l1 {b.strength:g}: "
                  f"{1 - b.zero_slices:.3f} -> {(1 - b.zero_slices) / (1 - r.zero_slices):.2f}x fewer")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["mlp", "cnn", "bitslice"], help="run one experiment")
    parser.add_argument("--seeds", type=int, default=3, help="training runs averaged per row (default 3)")
    args = parser.parse_args()
    seeds = list(range(SEED, SEED + args.seeds))
    torch.set_num_threads(1)
    x_train, x_test, y_train, y_test = load_split(SEED)
    flat = ((x_train.reshape(len(x_train), -1), y_train), (x_test.reshape(len(x_test), -1), y_test))
    if args.only in (None, "mlp"):
        run_mlp(*flat, seeds)
    if args.only in (None, "cnn"):
        run_cnn((x_train, y_train), (x_test, y_test), seeds)
    if args.only in (None, "bitslice"):
        run_bitslice(*flat, seeds)


if __name__ == "__main__":
    main()
