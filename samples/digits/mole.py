"""MoLe on scikit-learn digits: train on morphed data through an Aug-Conv layer, the paper's small-data check.

    python -m samples.digits.mole [--matrix uniform|orthogonal] [--epochs 30] [--seeds 3]

1. plain       the digits CNN trained on plain images (the developer's reference; its first conv is reused)
2. Aug-Conv    the provider morphs every image (pad 1, flatten, x @ M) and builds the Aug-Conv layer from the
               reference's first conv with its output channels shuffled; everything after it is trained from
               scratch on morphed data only (methods.md §5: train_with_ac)
3. no Aug-Conv the same CNN trained from scratch on the morphed vectors reshaped as 10x10 images (train_no_ac:
               what a developer gets from morphed data without the provider's layer)

Each row is the mean test accuracy over --seeds training runs (the split is fixed; torch on one thread).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from optimizer.morph import morph
from optimizer.training import AugConv, key_for_conv
from samples.digits.digits_cnn import SEED, accuracy, load_split, make_model, train


def run(matrix: str, epochs: int, seeds: list[int]) -> None:
    x_train, x_test, y_train, y_test = load_split(SEED)
    torch.manual_seed(SEED)
    reference = train(make_model(), x_train, y_train, epochs=epochs, seed=SEED)
    first = reference[0]
    key = key_for_conv(first, "input", x_train.shape[1:], kind=matrix, seed=SEED)
    m_train, m_test = morph(x_train, key), morph(x_test, key)
    side = int(np.sqrt(key.size))  # 1 x 10 x 10 padded digits: the control sees the morphed values as an image
    print(f"morphing key: {matrix}, D = {key.size} values per sample (plain: {x_train[0].size}), "
          f"condition number {np.linalg.cond(key.block):.3g}, morphed data {key.dtype}")
    print(f"{'model':<16}{'test acc (mean)':>16}{'per seed':>26}{'time':>9}")
    print(f"{'plain':<16}{100 * accuracy(reference, x_test, y_test):>15.2f}%{'(reference, seed 0)':>26}")

    def aug_conv_model(seed: int) -> nn.Sequential:
        torch.manual_seed(seed)
        rest = make_model()[1:]  # a fresh network after the first conv: trained from scratch
        return nn.Sequential(AugConv.from_conv(first, key, permute=True, seed=seed), *rest)

    def no_aug_conv_model(seed: int) -> nn.Sequential:
        torch.manual_seed(seed)
        model = make_model()
        model[11] = nn.Linear(32 * (side // 2) ** 2, 64)  # the classifier reads a 5x5 map instead of 4x4
        return model

    rows = [("Aug-Conv", aug_conv_model, m_train, m_test),
            ("no Aug-Conv", no_aug_conv_model, m_train.reshape(-1, 1, side, side).astype(np.float32),
             m_test.reshape(-1, 1, side, side).astype(np.float32))]
    for name, build, train_x, test_x in rows:
        started = time.perf_counter()
        scores = [accuracy(train(build(seed), train_x, y_train, epochs=epochs, seed=seed), test_x, y_test)
                  for seed in seeds]
        per_seed = " ".join(f"{100 * s:.1f}" for s in scores)
        print(f"{name:<16}{100 * np.mean(scores):>15.2f}%{per_seed:>26}{time.perf_counter() - started:>8.1f}s",
              flush=True)
    with torch.no_grad():
        shuffled = aug_conv_model(seeds[0])[0](torch.from_numpy(m_test[:4])).transpose(0, 1).flatten(1)
        plain = first(torch.from_numpy(x_test[:4])).transpose(0, 1).flatten(1)
    matches = [int(torch.cdist(channel[None], plain).argmin()) for channel in shuffled]
    exact = all(torch.allclose(shuffled[i], plain[j], atol=1e-4) for i, j in enumerate(matches))
    print(f"Aug-Conv(morphed) is the reference conv(plain) with its {len(matches)} channels shuffled: "
          f"{exact and sorted(matches) == list(range(len(matches)))} (order {matches})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", choices=["uniform", "orthogonal"], default="uniform")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.matrix, args.epochs, list(range(SEED, SEED + args.seeds)))


if __name__ == "__main__":
    main()
