"""A small CNN with BatchNorm trained in seconds on scikit-learn's digits (8x8 images, 10 classes), exported to ONNX.

`python samples/digits/digits_cnn.py OUT_DIR` writes:
  digits_cnn.onnx   input "input" [N, 1, 8, 8] float32 -> "logits" [N, 10]; BatchNormalization nodes kept
                    (exported with do_constant_folding=False) so `cleanup` has something to fold
  calibration.npz   {"input": 200 training images}
  eval.npz          {"input": held-out images, "labels": their digits}
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEED = 0


@dataclass
class DigitsAssets:
    model: Path
    calibration: Path
    eval: Path
    train_accuracy: float
    eval_accuracy: float


def load_split(seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits images scaled to [0, 1] as [N, 1, 8, 8] float32, split 75/25 with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target.astype(np.int64), test_size=0.25, random_state=seed, stratify=digits.target
    )
    return x_train, x_test, y_train, y_test


def make_model():
    import torch
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    ).to(torch.float32)


def train(model, x: np.ndarray, y: np.ndarray, epochs: int = 12, seed: int = SEED):
    import torch

    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=generator).split(64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            optimizer.step()
    model.eval()
    return model


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def build(out_dir: str | Path, epochs: int = 12) -> DigitsAssets:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(SEED)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        x_train, x_test, y_train, y_test = load_split()
        model = train(make_model(), x_train, y_train, epochs=epochs)
        paths = DigitsAssets(out_dir / "digits_cnn.onnx", out_dir / "calibration.npz", out_dir / "eval.npz",
                             accuracy(model, x_train, y_train), accuracy(model, x_test, y_test))
        torch.onnx.export(
            model, (torch.from_numpy(x_test[:1]),), str(paths.model), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
            do_constant_folding=False, dynamo=False,
        )
        np.savez(paths.calibration, input=x_train[:200])
        np.savez(paths.eval, input=x_test, labels=y_test)
        return paths
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    assets = build(sys.argv[1] if len(sys.argv) > 1 else "samples/digits/generated")
    print(f"wrote {assets.model} (train top-1 {assets.train_accuracy:.3f}, eval top-1 {assets.eval_accuracy:.3f})")
