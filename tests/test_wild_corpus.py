"""The corpus: ONNX files from other exporters (tests/wild_models.py) through inspect, cleanup, structured-sparse,
quantize and the tvm runtime. Each command gives a valid model (checker, ONNX Runtime runs it on the sample
data, output shapes kept) or a reasoned decline (exit 1/2 with one line; a declined channel group has a reason)."""

import json

import numpy as np
import onnx
import pytest

from optimizer.cli import main
from optimizer.model import save_model
from tests.wild_models import CORPUS, EXTERNAL, sample_data

WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN"}
TVM_PER_STYLE = {"zoo-ir3-constantofshape", "opset21-cnn", "paddle-cnn", "if-vad", "helper-gru",
                 "torchscript-encoder", "torchscript-conv-lstm", "dynamo-mlp", "external-mlp"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """id -> (model path, data path, source model); each model built once per test session."""
    root = tmp_path_factory.mktemp("corpus")
    built = {}
    for name, (_, factory) in CORPUS.items():
        model = factory()
        path = root / f"{name}.onnx"
        save_model(model, path, external=name in EXTERNAL)
        data = root / f"{name}.npz"
        np.savez(data, **sample_data(model))
        built[name] = (path, data, model)
    return built


def _ort_outputs(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    from runtimes import ort as sculpt_ort

    return list(sculpt_ort.load(model).run(feeds).values())


def _assert_valid(out, source: onnx.ModelProto, data) -> None:
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    feeds = dict(np.load(data))
    names = {i.name for i in model.graph.input}
    expected = [o.shape for o in _ort_outputs(source, feeds)]
    got = [o.shape for o in _ort_outputs(model, {k: v for k, v in feeds.items() if k in names})]
    assert got == expected


def _run(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_declined_with_reason(code: int, err: str) -> None:
    assert code in (1, 2), err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and len(lines[0]) > len("error: ") + 10, err


def test_the_corpus_has_twenty_graphs_from_five_styles():
    assert len(CORPUS) >= 20
    assert len({style for style, _ in CORPUS.values()}) >= 5


@pytest.mark.parametrize("name", list(CORPUS))
def test_inspect_lists_every_weighted_layer(name, corpus, tmp_path, capsys):
    path, data, source = corpus[name]
    report = tmp_path / "inspect.json"
    code, _, err = _run(["inspect", path, "--calibration", data, "--report", report], capsys)
    assert code == 0, err
    facts = json.loads(report.read_text())
    weighted = [n for n in source.graph.node if n.op_type in WEIGHTED]
    assert len(facts["layers"]) >= len(weighted)
    assert facts["stats"]["params"] > 0
    assert facts["stats"]["macs"] is not None or "unknown:" in facts["stats"]["macs_note"]
    assert "threshold" not in err and "[W]" not in err  # no third-party chatter


@pytest.mark.parametrize("spec", ["cleanup", "structured-sparse:ratio=0.5", "quantize"])
@pytest.mark.parametrize("name", list(CORPUS))
def test_passes_give_valid_models_or_reasoned_declines(name, spec, corpus, tmp_path, capsys):
    path, data, source = corpus[name]
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code, _, err = _run([path, "--pass", spec, "-o", out, "--calibration", data, "--report", report], capsys)
    if code != 0:
        _assert_declined_with_reason(code, err)
        assert not out.exists()
        return
    _assert_valid(out, source, data)
    details = json.loads(report.read_text())["passes"][0]["details"]
    for group in details.get("groups", []):
        assert group["status"] == "pruned" or group.get("reason")
    assert "threshold" not in err and "[W]" not in err


@pytest.mark.parametrize("name", sorted(TVM_PER_STYLE))
def test_tvm_runs_what_ort_runs(name, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SCULPT_CACHE_DIR", str(tmp_path / "cache"))
    path, data, source = corpus[name]
    out = tmp_path / "tvm.npz"
    code, _, err = _run(["run", path, "--runtime", "tvm", "--input", data, "--output", out, "--threads", "1"],
                        capsys)
    assert code == 0, err
    expected = _ort_outputs(source, dict(np.load(data)))
    for got, want in zip(np.load(out).values(), expected, strict=True):
        scale = max(float(np.abs(want).max()), 1e-6)
        assert np.abs(got - want).max() / scale <= 1e-4
