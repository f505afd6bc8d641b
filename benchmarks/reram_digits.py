"""The reram emulator against ONNX Runtime on the digits CNN's whole test split (float and 8-bit DFP QDQ forms).

For each model: ONNX Runtime, the emulator with its fast path (columns that provably cannot saturate are computed
as one exact integer product), and the emulator with every conversion simulated bit-serially (fast_path=false),
at the default 8-bit ADC and at 4 bits (where most columns can saturate). Rounds are interleaved so that load
from other processes hits every row alike; the table gives the median seconds per full pass and the ratio to
ONNX Runtime. Asserts nothing.

    .venv/bin/python benchmarks/reram_digits.py [--rounds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtimes  # noqa: E402
from optimizer.ort_session import ort_session  # noqa: E402
from optimizer.pipeline import optimize  # noqa: E402
from optimizer.verify import top1  # noqa: E402
from samples.digits.digits_cnn import build  # noqa: E402

ROWS = [("onnxruntime", None), ("reram 8-bit ADC, fast path", {}), ("reram 8-bit ADC, all bit-serial",
        {"fast_path": False}), ("reram 4-bit ADC, fast path", {"adc_bits": 4})]


def measure(model: onnx.ModelProto, evaluation: dict, calibration: dict, options: dict | None) -> tuple[float, float]:
    """(seconds for one pass over the test split, top-1)."""
    x, labels = evaluation["input"], evaluation["labels"]
    if options is None:
        session = ort_session(model)
        start = time.perf_counter()
        logits = session.run(None, {"input": x})[0]
        return time.perf_counter() - start, top1(logits, labels)
    session = runtimes.load("reram", model, calibration=calibration, **options)
    start = time.perf_counter()
    accuracy = session.evaluate(evaluation)["accuracy"]
    return time.perf_counter() - start, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="where to build the digits assets (default: temp)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="reram-digits-"))
    assets = build(out)
    model = onnx.load(str(assets.model))
    calibration = dict(np.load(assets.calibration))
    evaluation = dict(np.load(assets.eval))
    quantized, _ = optimize(model, passes=["cleanup", "quantize"], calibration=calibration)
    print(f"digits test split: {len(evaluation['labels'])} images, {args.rounds} interleaved rounds, median seconds")
    print(f"{'model':<10} {'runtime':<34} {'seconds':>8} {'x ORT':>8} {'top-1':>7}")
    for name, proto in (("float", model), ("qdq-dfp8", quantized)):
        times: dict[str, list[float]] = {label: [] for label, _ in ROWS}
        accuracy: dict[str, float] = {}
        for _ in range(args.rounds):
            for label, options in ROWS:
                seconds, accuracy[label] = measure(proto, evaluation, calibration, options)
                times[label].append(seconds)
        baseline = statistics.median(times["onnxruntime"])
        for label, _ in ROWS:
            median = statistics.median(times[label])
            print(f"{name:<10} {label:<34} {median:>8.3f} {median / baseline:>8.1f} {accuracy[label]:>7.4f}")


if __name__ == "__main__":
    main()
