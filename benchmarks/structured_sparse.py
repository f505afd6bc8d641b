"""structured-sparse on the six model families, a ResNet-18 at 224x224 and a ResNet-50-size graph.

For each model and ratio (uniform, l1): params and MACs kept, ONNX Runtime latency of the original and the
pruned model (one thread, batch 1, measured side by side: the two models alternate within every round and the
median of the round medians is reported), their ratio, and the pass time. Prints tables; asserts nothing.

    .venv/bin/python benchmarks/structured_sparse.py [--rounds 5] [--iterations 20] [--round-to 1]
                                                     [--skip-families] [--skip-r50]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from optimizer.report import model_stats  # noqa: E402
from passes import PassContext  # noqa: E402
from passes.structured_sparse import StructuredSparse  # noqa: E402

RATIOS = (0.3, 0.5, 0.7)
FAMILY_INPUTS = {  # larger inputs than the tests use, so latency is not all call overhead
    "resnet": (1, 3, 128, 128), "mobilenet": (1, 3, 128, 128), "dense_inception": (1, 3, 64, 64),
    "shufflenet": (1, 3, 64, 64), "xvector": (1, 8, 400), "transformer": (1, 128, 8),
}


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def side_by_side(models: list[onnx.ModelProto], feeds: dict, rounds: int, iterations: int) -> list[float]:
    """Median over rounds of each model's median latency (ms); the models alternate inside every round."""
    sessions = [session(m) for m in models]
    for s in sessions:
        for _ in range(3):
            s.run(None, feeds)
    per_round: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        samples: list[list[float]] = [[] for _ in sessions]
        for _ in range(iterations):
            for i, s in enumerate(sessions):
                start = time.perf_counter()
                s.run(None, feeds)
                samples[i].append(time.perf_counter() - start)
        for i, values in enumerate(samples):
            per_round[i].append(float(np.median(values)))
    return [1000 * float(np.median(values)) for values in per_round]


def prune(model: onnx.ModelProto, ratio: float, round_to: int = 1) -> tuple[onnx.ModelProto, float]:
    started = time.perf_counter()
    pruned, _ = StructuredSparse(StructuredSparse.Options(ratio=ratio, round_to=round_to)).run(model, PassContext())
    return pruned, time.perf_counter() - started


def row(name: str, ratio: float, model: onnx.ModelProto, feeds: dict, rounds: int, iterations: int,
        round_to: int = 1) -> str:
    pruned, seconds = prune(model, ratio, round_to)
    before, after = model_stats(model), model_stats(pruned)
    base, new = side_by_side([model, pruned], feeds, rounds, iterations)
    params, macs = after["params"] / before["params"], after["macs"] / before["macs"]
    return (f"{name:<22} {ratio:>5.1f} {params:>8.3f} {macs:>8.3f} {base:>10.3f} {new:>10.3f} {base / new:>8.2f}x"
            f" {seconds:>7.2f}")


HEADER = (f"{'model':<22} {'ratio':>5} {'params':>8} {'MACs':>8} {'base ms':>10} {'pruned ms':>10} {'speedup':>9} "
          f"{'pass s':>7}\n{'':<22} {'':>5} {'kept':>8} {'kept':>8}")




def resnet50():
    """ResNet-50 layout (bottleneck blocks 3-4-6-3, widths 64..2048, 1000 classes): 25.6 M parameters."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, mid: int, stride: int):
            super().__init__()
            cout = 4 * mid
            self.body = nn.Sequential(
                nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.down = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return torch.relu(self.body(x) + (x if self.down is None else self.down(x)))

    blocks, cin = [], 64
    for stage, (mid, count) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
        for i in range(count):
            blocks.append(Bottleneck(cin, mid, 2 if stage and not i else 1))
            cin = 4 * mid
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--skip-families", action="store_true")
    parser.add_argument("--skip-r50", action="store_true")
    parser.add_argument("--round-to", type=int, default=1, help="round_to for the family rows (try 4 or 8: ONNX "
                        "Runtime's blocked convolution kernels are slower on odd channel counts)")
    args = parser.parse_args()

    import torch
    from sparse_families import FAMILIES, ResNetLike, build, export, sample_input

    print(f"onnxruntime {ort.__version__}, 1 thread, batch 1; ratios of pruned / original\n")
    print(HEADER)
    if not args.skip_families:
        for family in FAMILIES:
            shape = FAMILY_INPUTS[family.name]
            model = export(build(family), shape)
            for ratio in RATIOS:
                print(row(family.name, ratio, model, sample_input(shape), args.rounds, args.iterations,
                          args.round_to), flush=True)
    torch.manual_seed(0)
    resnet18 = ResNetLike(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), classes=1000, imagenet_stem=True).eval()
    shape = (1, 3, 224, 224)
    model = export(resnet18, shape)
    print(row("resnet18 224x224", 0.5, model, sample_input(shape), args.rounds, max(3, args.iterations // 4)))
    if not args.skip_r50:
        model = export(resnet50().eval(), shape)
        _, seconds = prune(model, 0.5)
        params = model_stats(model)["params"]
        print(f"\nResNet-50-size graph ({len(model.graph.node)} nodes, {params / 1e6:.1f} M params): "
              f"structured-sparse ratio=0.5 took {seconds:.2f} s")


if __name__ == "__main__":
    main()
