"""The `tvm` runtime against ONNX Runtime on dense and block-sparse models: ORT ms, TVM ms, ratio, compile time.

Models (built with torch, exported to ONNX opset 17 with a dynamic batch):
    mlp          4 x Linear(1024, 1024), ReLU between                       input [B, 1024]
    transformer  one post-norm encoder block, d=768, 12 heads, FFN 3072, GELU, sequence 32   input [B, 32, 768]
    resnet18     ResNet-18 layout (7x7/2 stem, max-pool, 2-2-2-2 basic blocks of 64-128-256-512, avg-pool, fc),
                 64x64 input                                                 input [B, 3, 64, 64]
Sparse versions come from the `sparsify` pass (every Conv/Gemm/MatMul but the ResNet stem and classifier).
Both runtimes run the same model with the same thread count in one process; they take turns in short bursts for a
time budget and the fastest call of each is kept (robust to other load on a shared host). Asserts nothing, but
prints the max relative error of TVM against ORT for every row.

    .venv/bin/python benchmarks/tvm_sparse.py            # full grid: 3 models x 9 variants x batch 1/8/64 x 1/2 threads
    .venv/bin/python benchmarks/tvm_sparse.py --models mlp resnet18 --sparsity 0 0.9 --batch 8 --threads 1

Columns: ORT/TVM is the speedup of TVM (above 1: TVM faster), TVM/ORT its inverse; compile is the TVM build
time of that model and batch (s; a cache hit reports the original build and reuses it), load the seconds
`runtimes.load` took in this run (import, rewrite and build, or loading the cached library); bsr counts the
layers that run the block-sparse kernel; rel err is max |TVM - ORT| / max |ORT| on the same random input.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimizer.timing import interleaved_ms  # noqa: E402
from passes import PassContext  # noqa: E402
from passes.sparsify import Sparsify  # noqa: E402

MODELS = ("mlp", "transformer", "resnet18")
EXCLUDE = {"mlp": None, "transformer": None, "resnet18": r"(^|/)(stem|fc)\b"}


def build_torch(name: str):
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(1024, 1024), nn.ReLU())])
            self.out = nn.Linear(1024, 1024)

        def forward(self, x):
            return self.out(self.layers(x))

    class Encoder(nn.Module):
        """Shapes are Python constants (reshape with -1 for the batch), so the export has no Shape arithmetic."""

        def __init__(self, d=768, heads=12, ffn=3072, seq=32):
            super().__init__()
            self.d, self.heads, self.seq, self.scale = d, heads, seq, 1.0 / (d // heads) ** 0.5
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))

        def split(self, t):
            return t.reshape(-1, self.seq, self.heads, self.d // self.heads).transpose(1, 2)

        def forward(self, x):
            q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
            attention = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
            mixed = (attention @ v).transpose(1, 2).reshape(-1, self.seq, self.d)
            x = self.norm1(x + self.o(mixed))
            return self.norm2(x + self.ffn(x))

    class Basic(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + (x if self.down is None else self.down(x)))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU())
            self.pool = nn.MaxPool2d(3, 2, 1)
            widths, blocks, cin = (64, 128, 256, 512), [], 64
            for i, width in enumerate(widths):
                blocks += [Basic(cin, width, 1 if i == 0 else 2), Basic(width, width, 1)]
                cin = width
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(512, 10)

        def forward(self, x):
            x = self.blocks(self.pool(self.stem(x)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    if name == "mlp":
        return Mlp(), (2, 1024)
    if name == "transformer":
        return Encoder(), (2, 32, 768)
    model = ResNet18()
    for module in model.modules():  # non-trivial BN statistics, so folding them changes the weights
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model, (2, 3, 64, 64)


def build_model(name: str) -> onnx.ModelProto:
    """The dense model in ONNX (batch axis dynamic)."""
    import torch

    torch.set_num_threads(1)
    module, shape = build_torch(name)
    module.eval()
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / f"{name}.onnx"
        torch.onnx.export(
            module,
            (torch.randn(*shape),),
            str(path),
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            dynamo=False,
        )
        return onnx.load(str(path))


def sparsify(model: onnx.ModelProto, name: str, sparsity: float, block: str) -> onnx.ModelProto:
    if sparsity == 0:
        return model
    options = Sparsify.Options(sparsity=sparsity, pattern=block, exclude=EXCLUDE[name])
    return Sparsify(options).run(model, PassContext()).model


def run_case(model, name, sparsity, block, batch, threads, seconds, cache_dir) -> dict:
    import runtimes

    rng = np.random.default_rng(0)
    shape = {"mlp": (batch, 1024), "transformer": (batch, 32, 768), "resnet18": (batch, 3, 64, 64)}[name]
    feeds = {"input": rng.standard_normal(shape).astype(np.float32)}
    ort = runtimes.load("ort", model, threads=threads)
    start = time.perf_counter()
    tvm = runtimes.load("tvm", model, threads=threads, batch=batch, cache_dir=cache_dir)
    load_s = time.perf_counter() - start
    description = tvm.describe()
    expected, actual = ort.run(feeds)["output"], tvm.run(feeds)["output"]
    rel = float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))
    ort_ms, tvm_ms = interleaved_ms([lambda: ort.run(feeds), lambda: tvm.run(feeds)], seconds)
    kernels = [layer["kernel"] + (f" {layer['block']}" if layer["block"] else "") for layer in description["layers"]]
    return {
        "model": name,
        "sparsity": sparsity,
        "block": block if sparsity else "-",
        "batch": batch,
        "threads": threads,
        "ort_ms": ort_ms,
        "tvm_ms": tvm_ms,
        "speedup": ort_ms / tvm_ms,
        "rel_err": rel,
        "compile_s": description["compile_seconds"],
        "load_s": load_s,
        "cache_hit": description["cache_hit"],
        "bsr_layers": f"{sum(k.startswith('bsr') for k in kernels)}/{len(kernels)}",
    }


def print_row(row: dict) -> None:
    print(
        f"{row['model']:<12}{row['sparsity']:>6.2f} {row['block']:>5} {row['batch']:>5} {row['threads']:>3} "
        f"{row['ort_ms']:>9.3f} {row['tvm_ms']:>9.3f} {row['speedup']:>7.2f}x {row['tvm_ms'] / row['ort_ms']:>7.2f} "
        f"{row['compile_s']:>8.1f} {row['load_s']:>6.1f} {'hit' if row['cache_hit'] else 'miss':>5} "
        f"{row['bsr_layers']:>7} {row['rel_err']:>9.1e}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.0, 0.5, 0.8, 0.9, 0.95])
    parser.add_argument("--blocks", nargs="+", default=["16x1", "8x8"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--seconds", type=float, default=5.0, help="timing budget per row (calls alternate)")
    parser.add_argument("--cache-dir", default=None, help="TVM compile cache (default: a fresh temporary folder)")
    args = parser.parse_args()
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="sculpt-tvm-bench-")
    print(f"compile cache: {cache_dir}")
    print(
        f"{'model':<12}{'sparse':>6} {'block':>5} {'batch':>5} {'thr':>3} {'ORT ms':>9} {'TVM ms':>9} "
        f"{'ORT/TVM':>8} {'TVM/ORT':>7} {'compile':>8} {'load':>6} {'cache':>5} {'bsr':>7} {'rel err':>9}"
    )
    for name in args.models:
        dense = build_model(name)
        for sparsity in args.sparsity:
            for block in args.blocks if sparsity else ["-"]:
                model = sparsify(dense, name, sparsity, block)
                for batch in args.batch:
                    for threads in args.threads:
                        print_row(run_case(model, name, sparsity, block, batch, threads, args.seconds, cache_dir))


if __name__ == "__main__":
    main()
