"""The ONNX Model Zoo's classic graphs (the `light_*` models shipped inside the onnx package: IR 3, opset 9,
weights computed in the graph by ConstantOfShape) through the `optimize` CLI, as a new user would run them.

For each model: `--pass cleanup` and `--pass structured-sparse:ratio=R`, each in a fresh process; whether the
output is valid (ONNX checker, ORT runs it, output shapes equal the input model's), the weights kept relative
to the folded model (cleanup's output), and whether anything but Sculpt's own lines reached the terminal.
Prints a table; asserts nothing.

    .venv/bin/python benchmarks/wild_models.py [--ratio 0.5] [--only squeezenet,resnet50]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optimizer.data import random_inputs  # noqa: E402

OURS = ("note:", "warning:", "[1/1] running", "wrote ", "error:")  # Sculpt's own stderr lines


def light_models() -> list[Path]:
    return sorted((Path(onnx.__file__).parent / "backend" / "test" / "data" / "light").glob("light_*.onnx"))


def optimize(model: Path, spec: str, out: Path) -> tuple[int, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "optimizer.cli", str(model), "--pass", spec, "-o", str(out)],
                          capture_output=True, text=True, env=env, timeout=1800)
    foreign = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith(OURS)]
    return done.returncode, foreign


def weights(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)


def valid(source: onnx.ModelProto, out: Path) -> str:
    import onnxruntime as ort

    model = onnx.load(out)
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = random_inputs(model, 1, 0)
    shapes = [list(o.shape) for o in session.run(None, feeds)]
    expected = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in source.graph.output]
    return "yes" if shapes == expected else f"shapes {shapes} != {expected}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--only", default="", help="comma-separated substrings of model names")
    args = parser.parse_args()
    only = [s for s in args.only.split(",") if s]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in light_models():
            if only and not any(s in path.name for s in only):
                continue
            source = onnx.load(path)
            row = {"model": path.stem}
            for key, spec in (("cleanup", "cleanup"), ("sparse", f"structured-sparse:ratio={args.ratio}")):
                out = Path(tmp) / f"{path.stem}.{key}.onnx"
                code, foreign = optimize(path, spec, out)
                row[key] = valid(source, out) if code == 0 else f"exit {code}"
                row[f"{key}_foreign"] = len(foreign)
                row[f"{key}_weights"] = weights(onnx.load(out)) if code == 0 else None
            if row["cleanup_weights"] and row["sparse_weights"] is not None:
                row["kept"] = row["sparse_weights"] / row["cleanup_weights"]
            rows.append(row)
            print(_line(row), flush=True)
    ok = sum(r["cleanup"] == "yes" for r in rows), sum(r["sparse"] == "yes" for r in rows)
    small = sum(r.get("kept", 1.0) <= 0.7 for r in rows)
    print(f"cleanup valid {ok[0]}/{len(rows)}; structured-sparse:ratio={args.ratio} valid {ok[1]}/{len(rows)}, "
          f"<= 0.7 of the folded weights {small}/{len(rows)}; foreign terminal lines "
          f"{sum(r['cleanup_foreign'] + r['sparse_foreign'] for r in rows)}")


def _line(row: dict) -> str:
    kept = f"{row['kept']:.3f}" if "kept" in row else "-"
    return (f"{row['model']:24s} cleanup {row['cleanup']:5s} weights {row['cleanup_weights'] or 0:>12,}  "
            f"sparse {row['sparse']:5s} weights {row['sparse_weights'] or 0:>12,}  kept {kept}  "
            f"foreign lines {row['cleanup_foreign'] + row['sparse_foreign']}")


if __name__ == "__main__":
    main()
