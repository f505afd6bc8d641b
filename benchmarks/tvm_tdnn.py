"""An x-vector TDNN on ONNX Runtime and on the `tvm` runtime: ORT ms, TVM ms and their ratio, dense and narrow.

Model (torch, exported to ONNX opset 17): five dilated Conv1d frame layers over [batch, 30 log-mel bands, frames]
(30->512 k5, 512->512 k3 d2, 512->512 k3 d3, 512->512 k1, 512->1500 k1, ReLU after each), statistics pooling
(mean and standard deviation over time), Linear 3000->512, Linear 512->512, Linear 512->speakers.
`pruned` is the same network with 60% of the channels of every frame layer removed (what structured-sparse
leaves after pruning 60% of the channels): 205-205-205-205-600 frame channels, Linear 1200->512.

Both runtimes run the same model on the same input with one thread in one process, taking turns in short bursts;
the fastest call of each is kept. `--profile` adds TVM's per-op times (Relax VM profiler) for each model.

    .venv/bin/python benchmarks/tvm_tdnn.py                  # batch 1, 300 frames (a 3-second utterance)
    .venv/bin/python benchmarks/tvm_tdnn.py --profile --seconds 3
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

MELS = 30
DENSE_CHANNELS = (512, 512, 512, 512, 1500)
KEPT = 0.4  # pruned: 60% of every frame layer's channels removed
CONTEXTS = ((5, 1), (3, 2), (3, 3), (1, 1), (1, 1))  # (kernel, dilation) of the frame layers


def build_torch(channels: tuple[int, ...], embedding: int = 512, speakers: int = 120):
    import torch
    from torch import nn

    class StatisticsPooling(nn.Module):
        def forward(self, frames):
            mean = frames.mean(dim=2)
            variance = (frames * frames).mean(dim=2) - mean * mean
            return torch.cat([mean, torch.sqrt(torch.clamp(variance, min=1e-8))], dim=1)

    torch.manual_seed(0)
    layers, width = [], MELS
    for out, (kernel, dilation) in zip(channels, CONTEXTS, strict=True):
        layers += [nn.Conv1d(width, out, kernel, dilation=dilation), nn.ReLU()]
        width = out
    return nn.Sequential(
        *layers,
        StatisticsPooling(),
        nn.Linear(2 * width, embedding),
        nn.ReLU(),
        nn.Linear(embedding, embedding),
        nn.ReLU(),
        nn.Linear(embedding, speakers),
    ).eval()


def export(module, frames: int) -> onnx.ModelProto:
    import torch

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "tdnn.onnx"
        torch.onnx.export(
            module,
            (torch.randn(1, MELS, frames),),
            str(path),
            opset_version=17,
            input_names=["features"],
            output_names=["logits"],
            dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
        return onnx.load(str(path))


def tvm_profile(model: onnx.ModelProto, feeds: dict, repeats: int = 20) -> list[tuple[str, float]]:
    """(kernel, fastest ms) for every kernel the Relax VM calls, in call order, from the VM's instrumentation hook;
    the VM's own builtins (allocation, reshape views, shape checks) summed in one last row."""
    import tvm
    from tvm import relax

    from runtimes.tvm.compile import build
    from runtimes.tvm.target import host_target, use_threads

    use_threads(1)
    shapes = {name: array.shape for name, array in feeds.items()}
    vm = relax.VirtualMachine(build(model, shapes, host=host_target(), sparse="auto", block=None).executable, tvm.cpu())
    inputs = [tvm.runtime.tensor(array, tvm.cpu()) for array in feeds.values()]
    calls: list[tuple[str, float]] = []
    started: list[float] = []

    def instrument(func, symbol, before, ret, *args):
        if before:
            started.append(time.perf_counter())
        else:
            calls.append((symbol, time.perf_counter() - started.pop()))
        return relax.VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
    best: list[tuple[str, float]] = []
    for _ in range(repeats):
        calls.clear()
        vm["main"](*inputs)
        best = [(s, min(t, u)) for (s, t), (_, u) in zip(best, calls, strict=True)] if best else list(calls)
    kernels = [(symbol, seconds * 1e3) for symbol, seconds in best if not symbol.startswith("vm.builtin")]
    builtins = sum(seconds for symbol, seconds in best if symbol.startswith("vm.builtin"))
    return [*kernels, ("VM builtins (allocation, reshape, checks)", builtins * 1e3)]


def run(name: str, module, frames: int, batch: int, seconds: float, profile: bool) -> None:
    import runtimes

    model = export(module, frames)
    feeds = {"features": np.random.default_rng(0).standard_normal((batch, MELS, frames)).astype(np.float32)}
    ort = runtimes.load("ort", model, threads=1)
    start = time.perf_counter()
    tvm = runtimes.load("tvm", model, threads=1, batch=batch, cache=False)
    load_s = time.perf_counter() - start
    expected, actual = ort.run(feeds)["logits"], tvm.run(feeds)["logits"]
    rel = float(np.abs(actual - expected).max() / np.abs(expected).max())
    ort_ms, tvm_ms = interleaved_ms([lambda: ort.run(feeds), lambda: tvm.run(feeds)], seconds)
    taken = sum(layer["op"] == "conv1d" for layer in tvm.describe()["layers"])
    print(
        f"{name:<8}{batch:>6}{frames:>7}{ort_ms:>10.3f}{tvm_ms:>10.3f}{tvm_ms / ort_ms:>9.2f}"
        f"{load_s:>8.1f}{taken:>8}{rel:>10.1e}",
        flush=True,
    )
    if profile:
        rows = tvm_profile(model, feeds)
        total = sum(ms for _, ms in rows)
        for op, ms in rows:
            print(f"    {ms:8.3f} ms {100 * ms / total:5.1f}%  {op}")
        print(f"    {total:8.3f} ms  sum of the calls")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=4.0, help="timing budget per model (calls alternate)")
    parser.add_argument("--profile", action="store_true", help="print TVM's per-op times")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    pruned = tuple(round(c * KEPT) for c in DENSE_CHANNELS)
    print(f"{'model':<8}{'batch':>6}{'frames':>7}{'ORT ms':>10}{'TVM ms':>10}{'TVM/ORT':>9}{'load s':>8}"
          f"{'conv1d':>8}{'rel err':>10}")  # fmt: skip
    for name, channels in (("dense", DENSE_CHANNELS), ("pruned", pruned)):
        run(name, build_torch(channels), args.frames, args.batch, args.seconds, args.profile)


if __name__ == "__main__":
    main()
