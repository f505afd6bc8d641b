"""Sculpt's `quantize` (8-bit DFP, per-channel) against onnxruntime.quantization.quantize_static on the digits CNN.

Both start from the same BN-folded float model and calibrate on the same 200 training images; both are run by
ONNX Runtime with one thread. Latency is measured side by side (the three models interleaved, repeated rounds,
median of the round medians), so that load from other processes hits them alike. Prints a table; asserts nothing.

    .venv/bin/python benchmarks/quantize.py [--rounds 7] [--iterations 200] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimizer.data import load_npz, split_labels  # noqa: E402
from optimizer.ort_session import ort_session  # noqa: E402
from optimizer.verify import top1  # noqa: E402
from passes import PassContext  # noqa: E402
from passes.cleanup import cleanup_model  # noqa: E402
from passes.quantize import Quantize  # noqa: E402


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over one in-memory array, 32 samples per batch."""

    def __init__(self, images: np.ndarray):
        self._batches = iter([{"input": images[i : i + 32]} for i in range(0, len(images), 32)])

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def ort_static(float_path: Path, out_path: Path, calibration: np.ndarray) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(float_path),
        str(out_path),
        _Reader(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return onnx.load(str(out_path))


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort_session(model, threads=1)


def accuracy(sess: ort.InferenceSession, images: np.ndarray, labels: np.ndarray) -> float:
    return top1(sess.run(None, {"input": images})[0], labels)


def latencies(sessions: dict[str, ort.InferenceSession], feed: dict, rounds: int, iterations: int) -> dict:
    """Median over rounds of each model's median per-call time (seconds); models interleaved inside each round."""
    for sess in sessions.values():
        for _ in range(20):
            sess.run(None, feed)
    per_round: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            times = []
            for _ in range(iterations):
                start = time.perf_counter()
                sess.run(None, feed)
                times.append(time.perf_counter() - start)
            per_round[name].append(float(np.median(times)))
    return {name: float(np.median(values)) for name, values in per_round.items()}


def op_counts(model: onnx.ModelProto) -> str:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return ", ".join(f"{op} {n}" for op, n in sorted(counts.items()) if op in ("QuantizeLinear", "DequantizeLinear"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None, help="keep the models here (default: a temporary dir)")
    args = parser.parse_args()

    from samples.digits.digits_cnn import build

    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        assets = build(work / "digits")
        float_model = cleanup_model(onnx.load(str(assets.model)))
        float_path = work / "digits_folded.onnx"
        onnx.save(float_model, str(float_path))
        calibration = load_npz(assets.calibration)
        images, labels = split_labels(load_npz(assets.eval))
        images = images["input"]

        sculpt, report = Quantize(Quantize.Options(bits=8, scale="dfp", granularity="channel")).run(
            float_model, PassContext(calibration=calibration, calibration_is_random=False)
        )
        onnx.save(sculpt, str(work / "digits_sculpt_dfp.onnx"))
        ort_model = ort_static(float_path, work / "digits_ort_static.onnx", calibration["input"])
        models = {"float (BN folded)": float_model, "sculpt dfp/channel": sculpt, "ort quantize_static": ort_model}
        sessions = {name: session(model) for name, model in models.items()}

        top1 = {name: accuracy(sess, images, labels) for name, sess in sessions.items()}
        batch1 = latencies(sessions, {"input": images[:1]}, args.rounds, args.iterations)
        batch64 = latencies(sessions, {"input": images[:64]}, args.rounds, max(1, args.iterations // 10))

    base = "float (BN folded)"
    print(
        f"digits CNN, {len(labels)} eval images, calibration {len(calibration['input'])} images, "
        f"onnxruntime {ort.__version__}, 1 thread"
    )
    header = (
        f"{'model':<22}{'top-1':>8}{'Δ pt':>8}{'b=1 µs':>10}{'×float':>8}{'b=64 µs':>10}{'×float':>8}"
        f"{'bytes':>9}  Q/DQ nodes"
    )
    print(header)
    print("-" * len(header))
    for name, model in models.items():
        print(
            f"{name:<22}{top1[name]:>8.4f}{100 * (top1[name] - top1[base]):>+8.2f}"
            f"{1e6 * batch1[name]:>10.1f}{batch1[name] / batch1[base]:>8.2f}"
            f"{1e6 * batch64[name]:>10.1f}{batch64[name] / batch64[base]:>8.2f}"
            f"{model.ByteSize():>9}  {op_counts(model) or '-'}"
        )
    fls = [layer.get("frac_length") for layer in report["layers"]]
    print(
        "sculpt fractional lengths per layer (per channel, min..max):",
        ", ".join(f"{min(f)}..{max(f)}" if isinstance(f, list) else str(f) for f in fls),
    )


if __name__ == "__main__":
    main()
