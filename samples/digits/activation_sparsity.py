"""Activation sparsity on the digits CNN: training it in (DASNet WTA dropout, JPnet thresholds) vs masking afterwards.

    python samples/digits/activation_sparsity.py [--granularity element|channel] [--keep 0.2] [--fine-tune-epochs 20]

Rows, all on the held-out split of samples/digits/digits_cnn.py (same architecture, same data):
  dense                      the trained CNN; its ReLU outputs are already sparse ("natural sparsity")
  WTA-dropout trained        the dense CNN fine-tuned with WTADropout(keep) after every ReLU (DASNet), keep ramped
                             down from 1 over the first half of fine-tuning
  threshold trained          fine-tuned with scheduled ActivationThreshold modules (JPnet) to the same sparsity
  pass: wta keep=K           the `activation-prune` pass on the dense ONNX, the same k per layer as the WTA model
  pass: wta / threshold      the pass calibrated (200 training images) to the WTA model's measured sparsity
Activation sparsity is the fraction of exact zeros over every masked activation (the four ReLU outputs, masked),
element-weighted. The trained models are exported to ONNX and their ORT accuracy is printed next to torch's.
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import warnings
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from optimizer.verify import top1  # noqa: E402
from samples.digits.digits_cnn import SEED, load_split, make_model, train  # noqa: E402

CALIBRATION_SAMPLES = 200


def with_masks(model, make_mask):
    """A copy of a Sequential CNN with `make_mask()` inserted after every ReLU."""
    from torch import nn

    layers = []
    for layer in copy.deepcopy(model):
        layers.append(layer)
        if isinstance(layer, nn.ReLU):
            layers.append(make_mask())
    return nn.Sequential(*layers)


def masked_outputs(model, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits and the output of every mask module (or of every ReLU when there is none)."""
    import torch
    from torch import nn

    from optimizer.training.activation import ActivationThreshold, WTADropout

    mask_types = (WTADropout, ActivationThreshold)
    wanted = mask_types if any(isinstance(m, mask_types) for m in model) else (nn.ReLU,)
    captured = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(out)) for m in model if isinstance(m, wanted)]
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    for hook in hooks:
        hook.remove()
    return logits, [c.numpy() for c in captured]


def summarize(logits: np.ndarray, activations: list[np.ndarray], labels: np.ndarray) -> dict:
    zeros = sum(int(np.count_nonzero(a == 0)) for a in activations)
    elements = sum(a.size for a in activations)
    return {
        "accuracy": top1(logits, labels),
        "sparsity": zeros / elements,
        "layers": [float(np.mean(a == 0)) for a in activations],
    }


def fine_tune(model, x: np.ndarray, y: np.ndarray, epochs: int, on_step, lr: float = 2e-3, seed: int = SEED):
    """Adam with cosine decay; `on_step(fraction_done)` runs before every batch (ramps keep ratios or targets)."""
    import torch

    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    batches = [idx for _ in range(epochs) for idx in torch.randperm(len(xt), generator=generator).split(64)]
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, len(batches))
    model.train()
    for step, idx in enumerate(batches):
        on_step(step / len(batches))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return model


def train_wta(dense, x, y, keep: float, granularity: str, epochs: int):
    """DASNet recipe: WTA dropout after every ReLU, keep ratio ramped from 1 to `keep` over the first half."""
    from optimizer.training.activation import WTADropout

    model = with_masks(dense, lambda: WTADropout(1.0, granularity=granularity))
    masks = [m for m in model if isinstance(m, WTADropout)]

    def ramp(done: float) -> None:
        for mask in masks:
            mask.set_keep(1.0 - (1.0 - keep) * min(1.0, 2.0 * done))

    return fine_tune(model, x, y, epochs, ramp)


def train_threshold(dense, x, y, sparsity: float, epochs: int):
    """JPnet recipe: scheduled thresholds whose target sparsity ramps from 0 to `sparsity` over the first half."""
    from optimizer.training.activation import ActivationThreshold, ThresholdSchedule

    model = with_masks(dense, lambda: ActivationThreshold(0.0))
    steps = epochs * -(-len(x) // 64) // 2
    schedule = ThresholdSchedule(model, sparsity, steps)
    return fine_tune(model, x, y, epochs, lambda _done: schedule.step())


def export_onnx(model, example: np.ndarray):
    """ONNX (opset 17, dynamic batch) of a torch model in eval mode, as a ModelProto."""
    import onnx
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():  # tracing reads static shapes (k = ceil(keep * units)) as Python ints on purpose
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval(), (torch.from_numpy(example[:1]),), buffer, input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
        )  # fmt: skip
    return onnx.load_from_string(buffer.getvalue())


def ort_accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    from optimizer.verify import run_ort

    return top1(next(iter(run_ort(model, {"input": x}).values())), y)


def post_training(dense_onnx, spec: dict, x_cal, x_test, y_test) -> dict:
    """The activation-prune pass on the dense ONNX, measured on the held-out split."""
    from passes import PassContext, get_pass

    ctx = PassContext(calibration={"input": x_cal}, calibration_is_random=False,
                      evaluation={"input": x_test, "labels": y_test})  # fmt: skip
    _, report = get_pass("activation-prune").from_spec(spec).run(dense_onnx, ctx)
    return {
        "accuracy": report["accuracy"]["after"],
        "sparsity": report["eval_activation_sparsity"],
        "layers": [row["eval_sparsity"] for row in report["layers"]],
    }


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--granularity", choices=["element", "channel"], default="element", help="what WTA ranks")
    parser.add_argument("--keep", type=float, default=0.2, help="WTA kept fraction per sample")
    parser.add_argument("--epochs", type=int, default=12, help="epochs of dense training")
    parser.add_argument("--fine-tune-epochs", type=int, default=20, help="epochs of each sparsity fine-tuning")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    x_train, x_test, y_train, y_test = load_split()
    x_cal = x_train[:CALIBRATION_SAMPLES]
    dense = train(make_model(), x_train, y_train, epochs=args.epochs)
    rows = {"dense": summarize(*masked_outputs(dense, x_test), y_test)}
    wta = train_wta(dense, x_train, y_train, args.keep, args.granularity, args.fine_tune_epochs)
    wta_name = f"WTA-dropout trained ({args.granularity})"
    rows[wta_name] = summarize(*masked_outputs(wta, x_test), y_test)
    rows[wta_name]["onnx_accuracy"] = ort_accuracy(export_onnx(wta, x_test), x_test, y_test)
    target = round(rows[wta_name]["sparsity"], 3)
    jpnet = train_threshold(dense, x_train, y_train, target, args.fine_tune_epochs)
    rows["threshold trained"] = summarize(*masked_outputs(jpnet, x_test), y_test)
    rows["threshold trained"]["onnx_accuracy"] = ort_accuracy(export_onnx(jpnet, x_test), x_test, y_test)

    dense_onnx = export_onnx(dense, x_test)
    wta_pass = {"method": "wta", "granularity": args.granularity}
    for name, spec in (
        (f"pass: wta keep={args.keep}", {**wta_pass, "keep": args.keep}),
        (f"pass: wta sparsity={target}", {**wta_pass, "sparsity": target}),
        (f"pass: threshold sparsity={target}", {"method": "threshold", "sparsity": target}),
    ):
        rows[name] = post_training(dense_onnx, spec, x_cal, x_test, y_test)
    print_table(rows)
    return rows


def print_table(rows: dict[str, dict]) -> None:
    dense_accuracy = rows["dense"]["accuracy"]
    print(f"{'model':34} {'top-1':>7} {'Δ pt':>6} {'act. sparsity':>13}  per layer        {'ONNX top-1':>10}")
    for name, row in rows.items():
        layers = " ".join(f"{s:.2f}" for s in row["layers"])
        onnx_accuracy = f"{row['onnx_accuracy']:.4f}" if "onnx_accuracy" in row else ""
        drop = 100.0 * (dense_accuracy - row["accuracy"])
        print(f"{name:34} {row['accuracy']:7.4f} {drop:6.2f} {row['sparsity']:13.3f}  {layers:16} {onnx_accuracy:>10}")


if __name__ == "__main__":
    main()
