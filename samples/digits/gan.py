"""The conditional transferring-features GAN on scikit-learn digits against its baselines and ablations.

    python -m samples.digits.gan [--seeds N] [--quick] [--steps S] [--jobs J] [--setups NAME ...] [--out DIR]

A design of ours from the abstract of Wu, Wen, Chen, Li (arXiv 1909.11308; optimizer/training/gan.py says what was
chosen); the paper's numbers are not reproduced. Per seed, the 1347 training images are split per class into an HQ
pool (70%) and LQ copies of the other 30% (2x average-pool + bilinear upsampling, Gaussian blur 0.5 px, noise 0.1).
Setups (same generator, projection discriminator with spectral norm, hinge loss, steps and batch):
  transfer_70hq_lq       HQ pool as real data; generator conditioned on transfer features of the HQ pool and of the
                         LQ pool (transfer branch trained on degraded HQ pairs); rotation head on D
  cgan_70hq              plain cGAN on the HQ pool only
  cgan_100hq             plain cGAN on all 1347 HQ training images
  cgan_70hq_lq_as_hq     plain cGAN on the HQ pool plus the LQ pool used as if it were HQ
  ablation_no_transfer   the rotation-headed cGAN on the HQ pool (without the branch the LQ pool has no use but as HQ)
  ablation_no_rotation   transfer_70hq_lq without the rotation head
  ablation_no_lq         transfer_70hq_lq with the LQ pool left out (features of the HQ pool only): what the
                         feature conditioning gives without any LQ data
Measured by the digits CNN trained once (seed 0) on all real training images: class-conditional accuracy of 1000
generated images (100 per class), FID in its 64 penultimate features against the 450 real test images, and
diversity (within-class mean pairwise feature distance, generated / real test). Writes gan_results.json, one PNG
grid of samples per setup (first seed; rows are classes) and the exported transfer generator (checked against ORT).
Runs go to --jobs worker processes (default 2, one torch thread each); every figure is the same for any --jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from optimizer.training import export
from optimizer.training.gan import GANConfig, GanSampler, train_gan
from optimizer.training.gan_metrics import Judge, generation_metrics
from optimizer.training.gan_transfer import Degradation, TransferConfig, quality_pools, train_transfer
from samples.digits.digits_cnn import load_split, make_model
from samples.digits.digits_cnn import train as train_classifier

HQ_FRACTION = 0.7
DEGRADATION = Degradation(factor=2, blur_sigma=0.5, noise_std=0.1)
GAN = GANConfig(steps=800, batch_size=64, width=32, lr_g=2e-4, lr_d=8e-4, betas=(0.0, 0.9))
TRANSFER = TransferConfig(features=16, steps=400, degradation=DEGRADATION)
PER_CLASS = 100
BASELINES = ("cgan_70hq", "cgan_100hq", "cgan_70hq_lq_as_hq")
METRICS = ("accuracy", "fid", "diversity")


def gain(metric: str, ours: float, theirs: float) -> float:
    """How much better `ours` is than `theirs` (> 0: better): higher accuracy, lower FID, diversity nearer 1 (real
    data's; above 1 means scattered features, e.g. noisy images, not a richer model)."""
    if metric == "accuracy":
        return ours - theirs
    if metric == "fid":
        return theirs - ours
    return abs(theirs - 1) - abs(ours - 1)


@dataclass(frozen=True)
class Setup:
    data: str  # "70hq", "100hq", "70hq+lq as hq" or "70hq+lq"
    transfer: bool
    rotation: bool


SETUPS = {
    "transfer_70hq_lq": Setup("70hq+lq", True, True),
    "cgan_70hq": Setup("70hq", False, False),
    "cgan_100hq": Setup("100hq", False, False),
    "cgan_70hq_lq_as_hq": Setup("70hq+lq as hq", False, False),
    "ablation_no_transfer": Setup("70hq", False, True),
    "ablation_no_rotation": Setup("70hq+lq", True, False),
    "ablation_no_lq": Setup("70hq", True, True),
}


def train_setup(setup: Setup, pools, full: tuple[torch.Tensor, torch.Tensor], branch, config: GANConfig):
    config = config if setup.rotation else replace(config, rotation_weight=0.0)
    if setup.transfer:
        lq = (pools.lq_x, pools.lq_y) if setup.data == "70hq+lq" else None
        return train_gan(pools.hq_x, pools.hq_y, config, transfer=branch, lq=lq)
    if setup.data == "100hq":
        return train_gan(*full, config)
    if setup.data == "70hq":
        return train_gan(pools.hq_x, pools.hq_y, config)
    return train_gan(torch.cat([pools.hq_x, pools.lq_x]), torch.cat([pools.hq_y, pools.lq_y]), config)


def transfer_diagnostics(branch, pools) -> dict[str, float]:
    """On the LQ pool, whose HQ originals training never saw: feature and pixel errors before and after transfer."""
    with torch.no_grad():
        target = branch.features(pools.lq_sources)
        before = float(((branch.features(pools.lq_x) - target) ** 2).mean())
        after = float(((branch.transfer(pools.lq_x, pools.lq_y) - target) ** 2).mean())
        restored = branch.restore(pools.lq_x, pools.lq_y)
    return {"feature_mse_lq": before, "feature_mse_transferred": after,
            "pixel_mse_lq": float(((pools.lq_x - pools.lq_sources) ** 2).mean()),
            "pixel_mse_restored": float(((restored - pools.lq_sources) ** 2).mean())}


def save_grid(images: torch.Tensor, path: Path, title: str, *, scale: int = 4) -> None:
    """images [10 * n, 1, H, W] ordered class-major -> one PNG (written atomically), a row per class, each pixel
    `scale` x `scale`, dark ink on white, the title above."""
    from PIL import Image, ImageDraw

    rows = 10
    per_row = len(images) // rows
    framed = torch.nn.functional.pad(images[:, 0].clamp(0, 1), (1, 1, 1, 1))  # a blank pixel between images
    h, w = framed.shape[-2:]
    grid = framed.reshape(rows, per_row, h, w).permute(0, 2, 1, 3).reshape(rows * h, per_row * w)
    cells = Image.fromarray((255 * (1 - grid.numpy())).astype(np.uint8))
    cells = cells.resize((cells.width * scale, cells.height * scale), Image.NEAREST)
    canvas = Image.new("L", (max(cells.width, 8 * len(title)) + 8, cells.height + 22), 255)
    canvas.paste(cells, (4, 18))
    ImageDraw.Draw(canvas).text((4, 3), title, fill=0)
    tmp = path.with_suffix(".tmp.png")
    canvas.save(tmp)
    os.replace(tmp, path)


def check_export(sampler: GanSampler, path: Path) -> float:
    """Export `sampler` and return max |ORT - torch| on 64 seeded samples."""
    import onnxruntime as ort

    noise, labels = sampler.noise(64, seed=123), torch.arange(64) % 10
    export(sampler, (noise, labels), path, input_names=["noise", "labels"], output_names=["images"],
           metadata={"gan": {"noise_dim": sampler.noise_dim, "classes": 10}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_images = session.run(None, {"noise": noise.numpy(), "labels": labels.numpy()})[0]
    with torch.no_grad():
        torch_images = sampler.eval()(noise, labels).numpy()
    return float(np.abs(onnx_images - torch_images).max())


@dataclass
class Task:
    """One (seed, setup) training run with everything it needs, so that runs can go to worker processes."""

    seed: int
    name: str
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    classifier_state: dict
    config: GANConfig
    transfer: TransferConfig
    keep: bool  # return the sample grid and the sampler (first seed)


def run_task(task: Task) -> dict:
    """Train one setup and measure it; the transfer branch (deterministic per seed) is trained where it is needed."""
    torch.set_num_threads(1)
    started = time.process_time()
    x_train, y_train, x_test, y_test = task.data
    classifier = make_model()
    classifier.load_state_dict(task.classifier_state)
    judge = Judge.from_sequential(classifier.eval())
    setup = SETUPS[task.name]
    pools = quality_pools(x_train, y_train, hq_fraction=HQ_FRACTION, degradation=DEGRADATION, seed=task.seed)
    branch = train_transfer(pools.hq_x, pools.hq_y, replace(task.transfer, seed=task.seed)) if setup.transfer else None
    result = train_setup(setup, pools, (x_train, y_train), branch, replace(task.config, seed=task.seed))
    seconds = time.process_time() - started
    labels = torch.arange(10).repeat_interleave(PER_CLASS)
    images = result.sampler.sample(labels, seed=10_000 + task.seed)
    out = {"seed": task.seed, "name": task.name, "seconds": seconds,
           "metrics": generation_metrics(judge, images, labels, x_test, y_test).as_dict()}
    if task.name == "transfer_70hq_lq":
        out["diagnostics"] = transfer_diagnostics(branch, pools)
        out["references"] = {
            "real_hq_pool": generation_metrics(judge, pools.hq_x, pools.hq_y, x_test, y_test).as_dict(),
            "real_lq_pool": generation_metrics(judge, pools.lq_x, pools.lq_y, x_test, y_test).as_dict(),
            "real_train_100": generation_metrics(judge, x_train, y_train, x_test, y_test).as_dict(),
        }
    if task.keep:
        out["grid"] = images.view(10, PER_CLASS, 1, 8, 8)[:, :12].reshape(-1, 1, 8, 8)
        out["sampler"] = result.sampler
    out["cpu"] = time.process_time() - started
    return out


def run_tasks(tasks: list[Task], jobs: int):
    """Yield the result of every task, in order of completion when jobs > 1 (worker processes, fork)."""
    if jobs <= 1:
        yield from map(run_task, tasks)
        return
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        yield from pool.imap_unordered(run_task, tasks)


def mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def differences(per_seed: dict[str, list[dict]]) -> dict[str, dict[str, dict]]:
    """transfer_70hq_lq minus each other setup, per metric: the mean and the per-seed differences, the mean gain
    (see `gain`) and in how many seeds the transfer GAN was better."""
    out = {}
    ours = per_seed["transfer_70hq_lq"]
    for name, runs in per_seed.items():
        if name == "transfer_70hq_lq":
            continue
        out[name] = {}
        for metric in METRICS:
            diffs = [a[metric] - b[metric] for a, b in zip(ours, runs, strict=True)]
            gains = [gain(metric, a[metric], b[metric]) for a, b in zip(ours, runs, strict=True)]
            out[name][metric] = {"mean": float(np.mean(diffs)), "per_seed": diffs, "gain": float(np.mean(gains)),
                                 "better_in": sum(g > 0 for g in gains)}
    return out


def print_tables(per_seed, references, diagnostics, diffs, seeds) -> None:
    print(f"\nmean ± std over {len(seeds)} seed(s) {seeds}; 1000 generated images (100 per class) per setup; "
          "FID and diversity against the 450 real test images")
    print(f"{'setup':<24}{'accuracy':>16}{'FID':>16}{'diversity':>16}{'cpu s':>8}")
    for name, runs in per_seed.items():
        cells = "".join(f"{m:>9.3f} ± {s:<5.3f}" if metric != "fid" else f"{m:>9.2f} ± {s:<5.2f}"
                        for metric in METRICS for m, s in [mean_std([r[metric] for r in runs])])
        print(f"{name:<24}{cells}{np.mean([r['seconds'] for r in runs]):>8.1f}")
    for name, rows in references.items():
        cells = "".join(f"{np.mean([r[m] for r in rows]):>9.3f}{'':8}" if m != "fid" else
                        f"{np.mean([r[m] for r in rows]):>9.2f}{'':8}" for m in METRICS)
        print(f"{name + ' (real)':<24}{cells}")
    diag = {k: np.mean([d[k] for d in diagnostics]) for k in diagnostics[0]}
    print(f"\ntransfer branch on the LQ pool (originals unseen): feature MSE {diag['feature_mse_lq']:.4f} -> "
          f"{diag['feature_mse_transferred']:.4f} after transfer; pixel MSE {diag['pixel_mse_lq']:.4f} (LQ) -> "
          f"{diag['pixel_mse_restored']:.4f} (restored)")
    print("\ntransfer_70hq_lq minus each setup (mean; seeds where the transfer GAN is better / all):")
    for name, metrics in diffs.items():
        cells = "  ".join(f"{metric} {d['mean']:+.3f} ({d['better_in']}/{len(seeds)})" for metric, d in metrics.items())
        print(f"  vs {name:<22} {cells}")
    print("\nthe paper's claim (70% HQ + LQ at least as good as the baselines) on digits, by the mean gain over seeds "
          "(accuracy higher, FID lower, diversity nearer 1):")
    for name in [b for b in BASELINES if b in diffs]:
        verdict = [f"{metric} {'holds' if diffs[name][metric]['gain'] >= 0 else 'fails'}" for metric in METRICS]
        print(f"  vs {name:<22} " + ", ".join(verdict))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    parser.add_argument("--quick", action="store_true", help="one seed, 150 steps: a smoke run, not a measurement")
    parser.add_argument("--steps", type=int, default=None, help=f"GAN steps per run (default {GAN.steps})")
    parser.add_argument("--out", default="samples/digits/generated")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), metavar="NAME",
                        help=f"the setups to run (default all: {', '.join(SETUPS)}); transfer_70hq_lq always runs")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, one torch thread each (default 2: "
                        "one per core of the 2-core CI machine)")
    args = parser.parse_args()
    unknown = sorted(set(args.setups) - set(SETUPS))
    if unknown:
        parser.error(f"--setups: unknown {', '.join(unknown)}; the setups are {', '.join(SETUPS)}")
    names = [name for name in SETUPS if name in args.setups or name == "transfer_70hq_lq"]
    torch.set_num_threads(1)
    started, cpu_started = time.perf_counter(), time.process_time()
    config, transfer, seeds = GAN, TRANSFER, list(range(args.seeds))
    if args.quick:
        config, transfer, seeds = replace(GAN, steps=150), replace(TRANSFER, steps=150), [0]
    if args.steps is not None:
        config = replace(config, steps=args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("Conditional transferring-features GAN: our design from the paper's abstract (arXiv 1909.11308); these are "
          "not the paper's numbers.")
    x_train, x_test, y_train, y_test = (torch.from_numpy(a) for a in load_split())
    torch.manual_seed(0)
    classifier = train_classifier(make_model(), x_train.numpy(), y_train.numpy(), epochs=12, seed=0)
    tasks = [Task(seed, name, (x_train, y_train, x_test, y_test), classifier.state_dict(), config, transfer,
                  seed == seeds[0]) for seed in seeds for name in names]
    results: dict[tuple[int, str], dict] = {}
    for result in run_tasks(tasks, args.jobs):
        results[result["seed"], result["name"]] = result
        m = result["metrics"]
        print(f"  seed {result['seed']} {result['name']:<22} accuracy {m['accuracy']:.3f}  fid {m['fid']:7.2f}  "
              f"diversity {m['diversity']:.3f}  {result['seconds']:5.1f} cpu s", flush=True)
        if "grid" in result:
            save_grid(result["grid"], out / f"gan_samples_{result['name']}.png",
                      f"{result['name']} (seed {result['seed']})")
    per_seed = {name: [{**results[seed, name]["metrics"], "seconds": results[seed, name]["seconds"]}
                       for seed in seeds] for name in names}
    ours = [results[seed, "transfer_70hq_lq"] for seed in seeds]
    references = {name: [r["references"][name] for r in ours] for name in ours[0]["references"]}
    diagnostics = [r["diagnostics"] for r in ours]
    diffs = differences(per_seed)
    print_tables(per_seed, references, diagnostics, diffs, seeds)
    export_error = check_export(ours[0]["sampler"], out / "gan_generator.onnx")
    print(f"\nexported transfer_70hq_lq generator (seed {seeds[0]}) to {out / 'gan_generator.onnx'}: "
          f"max |ORT - torch| = {export_error:.2e}")
    total = time.perf_counter() - started
    cpu = time.process_time() - cpu_started + (sum(r["cpu"] for r in results.values()) if args.jobs > 1 else 0.0)
    print(f"total {total:.0f}s wall, {cpu:.0f}s cpu ({args.jobs} process(es), torch threads 1; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores)")
    summary = {
        "setups": {name: {m: mean_std([r[m] for r in runs])[0] for m in METRICS}
                   for name, runs in per_seed.items()},
        "seeds": seeds,
        "per_seed": per_seed,
        "std": {name: {m: mean_std([r[m] for r in runs])[1] for m in METRICS}
                for name, runs in per_seed.items()},
        "references": {name: {m: float(np.mean([r[m] for r in rows])) for m in METRICS}
                       for name, rows in references.items()},
        "transfer_diagnostics": diagnostics,
        "differences": diffs,
        "export_max_abs_error": export_error,
        "config": {"gan": vars(config), "transfer_steps": transfer.steps,
                   "degradation": vars(DEGRADATION), "hq_fraction": HQ_FRACTION, "per_class": PER_CLASS,
                   "quick": args.quick, "jobs": args.jobs},
        "seconds": total,
        "cpu_seconds": cpu,
        "load_average": os.getloadavg()[0],
    }
    print(f"wrote {write_json(summary, out / 'gan_results.json')}")


def write_json(value: dict, path: Path) -> Path:
    """Write `value` as JSON to `path` atomically (a temporary file, then a rename)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    main()
