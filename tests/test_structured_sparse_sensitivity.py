"""`optimize sensitivity`: each group pruned alone, the metric drop, worst first."""

from __future__ import annotations

import functools
import json
import re

import numpy as np
import pytest
from channel_graphs import run
from sparse_families import FAMILIES, build, export

from optimizer.cli import main
from optimizer.errors import UsageError
from optimizer.sensitivity import parse_ratios, sensitivity
from passes import PassContext
from passes.structured_sparse import StructuredSparse

XVECTOR = next(f for f in FAMILIES if f.name == "xvector")
SHAPE = (32, *XVECTOR.input_shape[1:])


@functools.cache
def model_and_eval():
    """An x-vector model and labels equal to its own predictions, so the baseline top-1 is 1.0. The output
    layer is centred on this batch so that predictions spread over the classes instead of following the bias."""
    import torch

    net = build(XVECTOR)
    inputs = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    features = []
    net.bn7.register_forward_hook(lambda module, args, output: features.append(output))
    with torch.no_grad():
        net(torch.from_numpy(inputs))
        net.out.bias.copy_(-net.out.weight @ features[0].mean(0))
    model = export(net, SHAPE)
    labels = run(model, {"input": inputs})[0].argmax(-1)
    assert len(np.unique(labels)) > 2
    return model, {"input": inputs, "labels": labels}


def test_groups_are_sorted_by_their_worst_top1_drop():
    model, evaluation = model_and_eval()
    result = sensitivity(model, evaluation, ratios=(0.5, 0.9))
    assert (result["metric"], result["baseline"]) == ("top1", 1.0)
    worst = [max(r["drop"] for r in row["ratios"].values()) for row in result["groups"]]
    assert worst == sorted(worst, reverse=True) and worst[0] > 0
    assert len(result["groups"]) == 7  # five frame layers, two segment layers; the output layer is declined

    row = result["groups"][0]
    others = [g["name"] for g in result["groups"] if g["name"] != row["name"]]
    pass_ = StructuredSparse.from_spec({"ratio": 0.5, "exclude": "^(" + "|".join(map(re.escape, others)) + ")$"})
    pruned, details = pass_.run(model, PassContext())
    outputs = run(pruned, {"input": evaluation["input"]})[0]
    assert row["ratios"]["0.5"]["metric"] == pytest.approx(np.mean(outputs.argmax(-1) == evaluation["labels"]))
    assert row["ratios"]["0.5"]["kept"] == row["channels"] - row["channels"] // 2


def test_without_labels_the_metric_is_output_cosine():
    model, evaluation = model_and_eval()
    result = sensitivity(model, {"input": evaluation["input"]}, ratios=(0.5,))
    assert result["metric"] == "cosine" and result["baseline"] == pytest.approx(1.0)
    assert all(0 <= row["ratios"]["0.5"]["drop"] <= 2 for row in result["groups"])


def test_cli_writes_the_report_and_rejects_bad_ratios(tmp_path, capsys):
    import onnx

    model, evaluation = model_and_eval()
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "eval.npz", **evaluation)
    args = ["sensitivity", str(tmp_path / "m.onnx"), "--eval", str(tmp_path / "eval.npz")]
    assert main([*args, "--ratios", "0.5", "--report", str(tmp_path / "s.json")]) == 0
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["metric"] == "top1" and report["groups"][0]["ratios"]["0.5"]["drop"] >= 0
    assert "drop @ 0.5" in capsys.readouterr().out
    assert main([*args, "--ratios", "0.5,1.2"]) == 2
    with pytest.raises(UsageError, match="ratios"):
        parse_ratios("half")
