"""Three small models trained in seconds on scikit-learn's digits, for the accuracy-recovery tests and benchmark.

- rescnn: Conv+BN stem, two residual blocks (Conv-BN-ReLU-Conv-BN + skip), a strided Conv, global pooling.
- dwsep: depthwise-separable blocks (depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU), global pooling.
- encoder: the 8 image rows as 8 tokens, a 2-layer transformer encoder (4 heads), mean pooling.

`trained(name)` returns (ONNX model with an open batch axis, calibration feeds, eval feeds with labels); torch
runs on one thread and every seed is fixed, so the accuracy is the same on every machine.
"""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np
import onnx

SEED = 0


def _modules():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                      nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

        def forward(self, x):
            return torch.relu(x + self.body(x))

    class ResCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
            self.blocks = nn.Sequential(Block(24), Block(24))
            self.down = nn.Sequential(nn.Conv2d(24, 48, 3, 2, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU(),
                                      nn.Conv2d(48, 48, 3, padding=1, bias=False), nn.BatchNorm2d(48), nn.ReLU())
            self.head = nn.Linear(48, 10)

        def forward(self, x):
            return self.head(self.down(self.blocks(self.stem(x))).mean((2, 3)))

    def separable(cin: int, cout: int, stride: int = 1):
        return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    class DWSep(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                *separable(32, 64), *separable(64, 64, 2), *separable(64, 64))
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))

    class Encoder(nn.Module):
        def __init__(self, width: int = 48, heads: int = 4, ff: int = 96):
            super().__init__()
            self.proj = nn.Linear(8, width)
            self.position = nn.Parameter(0.1 * torch.randn(1, 8, width))
            layer = nn.TransformerEncoderLayer(width, heads, ff, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            for copy in self.encoder.layers:
                copy.self_attn._reset_parameters()
                copy.linear1.reset_parameters()
                copy.linear2.reset_parameters()
            self.head = nn.Linear(width, 10)

        def forward(self, x):
            tokens = self.proj(x[:, 0]) + self.position
            return self.head(self.encoder(tokens).mean(1))

    return {"rescnn": ResCNN, "dwsep": DWSep, "encoder": Encoder}


def _data():
    from samples.digits.digits_cnn import load_split

    return load_split(SEED)


def _train(model, x: np.ndarray, y: np.ndarray, epochs: int, lr: float = 3e-3):
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=generator).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
        schedule.step()
    model.eval()
    return model


def _export(model, example, dynamic: bool) -> onnx.ModelProto:
    import torch

    buffer = io.BytesIO()
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(example),), buffer, opset_version=17, dynamo=False,
                          input_names=["input"], output_names=["logits"], dynamic_axes=axes)
    return onnx.load_from_string(buffer.getvalue())


EPOCHS = {"rescnn": 8, "dwsep": 10, "encoder": 25}
NAMES = tuple(EPOCHS)


@functools.cache
def trained(name: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(model, calibration {"input": 128 training images}, eval {"input", "labels"}: the 450 held-out images)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(SEED)
        x_train, x_test, y_train, y_test = _data()
        model = _train(_modules()[name](), x_train, y_train, EPOCHS[name])
        # the encoder is exported with batch 1, as many transformer exports are (its attention reshapes then have
        # static shapes); the calibration and eval sets are fed to it one sample at a time
        onnx_model = _export(model, x_test[:1], dynamic=name != "encoder")
    finally:
        torch.set_num_threads(threads)
    return onnx_model, {"input": x_train[:128]}, {"input": x_test, "labels": y_test}
