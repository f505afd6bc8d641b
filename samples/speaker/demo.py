"""The headline demo: a far-field speaker model, trained with structured sparsity, pruned by a graph pass, faster.

    python -m samples.speaker.demo            # `make demo`

1. synthesise the far-field speaker corpus (cached under samples/speaker/generated/);
2. train a dense x-vector TDNN, then from it a group-Lasso-regularized one, threshold and fine-tune (cached);
3. export both to ONNX and run `optimize(..., passes=["structured-sparse:criterion=zero"])` on the regularized
   one: an exact pass, verified by the pipeline, that physically removes the zeroed channels;
4. score held-out speakers' trials with cosine similarity (EER) before and after, and for the dense model
   (trained without the regularizer) pruned by the same pass, l2 criterion, to the same shape and size;
5. benchmark dense vs pruned on ONNX Runtime and TVM side by side (1 thread, one 3-second utterance);
6. write samples/speaker/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from rich.console import Console

import optimizer
from optimizer.bench import bench
from optimizer.console import print_bench, print_pipeline_report
from optimizer.errors import SculptError
from optimizer.model import save_model
from optimizer.verify import run_ort
from passes.structured_sparse import count_params
from samples.speaker.corpus import GENERATED_DIR, Corpus, CorpusConfig, build
from samples.speaker.eer import cosine_scores, equal_error_rate
from samples.speaker.model import fold_batch_norm
from samples.speaker.train import TrainedModels, TrainingPlan, export_embedding, train_or_load

console = Console(highlight=False, soft_wrap=False, width=140)  # with markup: the demo's own headings use it

RESULTS = Path(__file__).resolve().parent / "results.json"
PRUNE_SPEC = "structured-sparse:criterion=zero"
BASELINE_CRITERION = "l2"
BASELINE_RECOVER = "lsq"  # the least-squares refit a user without the regularizer gets from the calibration data


def embeddings(model: onnx.ModelProto, features: np.ndarray, batch: int = 64) -> np.ndarray:
    """Embeddings of [utterances, mel bands, frames] features, computed by ONNX Runtime."""
    parts = [run_ort(model, {"features": features[i : i + batch]})["embedding"] for i in range(0, len(features), batch)]
    return np.concatenate(parts)


def eer_percent(model: onnx.ModelProto, features: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * equal_error_rate(*cosine_scores(embeddings(model, features), labels))


def prune_like(model: onnx.ModelProto, groups: list[dict], calibration: dict) -> tuple[onnx.ModelProto, dict]:
    """The same pass with an importance criterion instead of `zero`: every group the regularized model lost
    channels in is cut to the same width, keeping the channels with the largest producer norms and refitting the
    consumers on the calibration data. One pass per group (the others excluded), so the result has exactly the
    pruned model's shape and parameter count."""
    pruned = [g for g in groups if g["channels_after"] < g["channels_before"]]
    specs = []
    for group in pruned:
        others = [re.escape(p) for g in groups if g is not group for p in g["producers"]]
        ratio = (group["channels_before"] - group["channels_after"]) / group["channels_before"]
        options = {"criterion": BASELINE_CRITERION, "recover": BASELINE_RECOVER, "ratio": ratio, "round_to": 1,
                   "exclude": f"^({'|'.join(others)})$"}  # round_to=1: exactly the widths the exact pass left
        specs.append(("structured-sparse", options))
    return optimizer.optimize(model, passes=specs, calibration=calibration)


def speedups(results: dict) -> dict[str, float]:
    """Dense median / pruned median per runtime."""
    medians = {(r["model"], r["runtime"]): r["median_ms"] for r in results["results"]}
    return {
        runtime: medians[("dense", runtime)] / medians[("pruned", runtime)]
        for model, runtime in medians
        if model == "dense"
    }


class Stages:
    """Prints numbered stage headings with the time elapsed since the demo started."""

    def __init__(self):
        self.started = time.perf_counter()

    def __call__(self, text: str) -> None:
        console.print(f"\n[bold]{text}[/bold] [dim](t={self.elapsed():.0f} s)[/dim]")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def prepare(args: argparse.Namespace, stage: Stages) -> tuple[Corpus, TrainedModels]:
    torch.set_num_threads(args.threads)
    corpus_config, plan = CorpusConfig(), TrainingPlan()
    stage("1. corpus")
    corpus = build(corpus_config, workers=args.workers)
    speakers, held_out = len(set(corpus.train_labels)), len(set(corpus.test_labels))
    console.print(
        f"{speakers} training speakers × {len(corpus.train_labels) // speakers} utterances, {held_out} held-out "
        f"speakers × {len(corpus.test_labels) // held_out} utterances of {corpus.test_features.shape[2] / 100:.0f} s; "
        f"far field: {corpus_config.farfield}"
    )
    stage("2. training (dense, then group Lasso → threshold → fine-tune)")
    console.print(
        f"x-vector TDNN, frame layers {plan.frame_channels}, embedding {plan.embedding_dim}; dense: "
        f"{plan.dense_epochs} epochs; sparse: from the dense weights, {plan.regularizer} "
        f"(λ {plan.regularizer_weight:g} frame layers, {plan.segment_regularizer_weight:g} segment6) for "
        f"{plan.sparse_epochs} epochs, groups under {plan.threshold_std_ratio:g}× their layer's RMS zeroed, "
        f"{plan.finetune_epochs} epochs of fine-tuning"
    )
    trained = train_or_load(corpus, corpus_config, plan)
    console.print("reused cached checkpoints" if trained.from_cache else "trained and cached")
    return corpus, trained


def showcase(corpus: Corpus, trained: TrainedModels, stage: Stages, runs: int, out_dir: Path = GENERATED_DIR) -> dict:
    """Export, prune, score and benchmark; returns the figures written to results.json."""
    stage("3. export and structured-sparse")
    frames = corpus.test_features.shape[2]
    # BatchNorm folded (the same function): the dense graph then names its layers like the regularized one
    dense = export_embedding(fold_batch_norm(trained.dense), out_dir / "dense.onnx", frames)
    regularized = export_embedding(trained.sparse, out_dir / "regularized.onnx", frames, trained.regularizer)
    calibration = {"features": corpus.test_features[:8]}
    pruned, report = optimizer.optimize(regularized, passes=[PRUNE_SPEC], calibration=calibration)
    save_model(pruned, out_dir / "pruned.onnx")
    shell = f"optimize {os.path.relpath(out_dir / 'regularized.onnx')} --pass {PRUNE_SPEC} -o pruned.onnx"
    console.print(f"[dim]the same from the shell: {shell}[/dim]")
    print_pipeline_report(report)  # with the per-group table
    params_before, params_after = report["input"]["params"], report["output"]["params"]
    params_removed = 1 - params_after / params_before

    stage("4. equal error rate (cosine scoring, held-out speakers)")
    features, labels = corpus.test_features, corpus.test_labels
    eer_dense = eer_percent(dense, features, labels)
    eer_regularized = eer_percent(regularized, features, labels)
    eer_pruned = eer_percent(pruned, features, labels)
    baseline_pruned, _ = prune_like(dense, report["passes"][-1]["details"]["groups"], calibration)
    eer_baseline_pruned = eer_percent(baseline_pruned, features, labels)
    console.print(f"{len(labels) * (len(labels) - 1) // 2:,} trials; EER in %")
    rows = [
        ("dense model (no regularizer)", eer_dense, ""),
        ("regularized, before the pass", eer_regularized, ""),
        (
            "regularized, after structured-sparse",
            eer_pruned,
            f"{eer_pruned - eer_dense:+.2f} pt vs dense; {params_removed:.1%} of {params_before:,} parameters removed",
        ),
        (
            f"dense pruned to the same shape ({BASELINE_CRITERION}, {BASELINE_RECOVER})",
            eer_baseline_pruned,
            f"{eer_baseline_pruned - eer_dense:+.2f} pt vs dense; {count_params(baseline_pruned):,} parameters",
        ),
    ]
    for label, value, note in rows:
        console.print(f"  {label:44s} {value:6.2f}  {note}")

    stage("5. latency, dense vs pruned, side by side (1 thread, one 3-second utterance)")
    # cleaned as the pass cleans its input, so both graphs differ only by the removed channels
    dense_clean, _ = optimizer.optimize(dense, passes=["cleanup"], calibration=calibration)
    results = bench(
        [("dense", dense_clean), ("pruned", pruned)],
        ["ort", "tvm"],
        inputs={"features": features[:1]},
        threads=1,
        runs=runs,
        warmup=5,
    )
    print_bench(results)
    speedup = speedups(results)
    console.print(f"speedup dense/pruned: ORT {speedup['ort']:.2f}x, TVM {speedup['tvm']:.2f}x")
    return {
        "params_removed": round(params_removed, 4),
        "eer_dense": round(eer_dense, 3),
        "eer_pruned": round(eer_pruned, 3),
        "eer_pruned_unregularized": round(eer_baseline_pruned, 3),
        "ort_speedup": round(speedup["ort"], 3),
        "tvm_speedup": round(speedup["tvm"], 3),
    }


def run(args: argparse.Namespace) -> dict:
    stage = Stages()
    corpus, trained = prepare(args, stage)
    summary = showcase(corpus, trained, stage, args.runs)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    stage(f"6. results → {RESULTS}")
    console.print_json(json.dumps(summary))
    console.print(f"[dim]demo finished in {stage.elapsed():.0f} s[/dim]")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training [2]")
    parser.add_argument("--workers", type=int, default=2, help="processes synthesising the corpus [2]")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per benchmark row [50]")
    args = parser.parse_args(argv)
    try:
        run(args)
    except SculptError as e:
        console.print(f"[red]error:[/red] {e}")
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
