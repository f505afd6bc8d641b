"""Pipeline instruments: hook order, the speed gate's report and its failure (timings injected, never asserted)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import optimizer.timing
from optimizer.cli import main
from optimizer.instruments import Instrument, default_instruments
from optimizer.pipeline import optimize


def mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def timings(monkeypatch):
    """Replace the measurement: each call returns the next [before_ms, after_ms] pair."""
    pairs: list[list[float]] = []

    def fake(functions, seconds, burst_s=0.05):
        for function in functions:
            function()  # the sessions really run once
        return pairs.pop(0)

    monkeypatch.setattr(optimizer.timing, "interleaved_ms", fake)
    return pairs


def test_gate_fails_a_pass_that_claims_a_speedup_it_does_not_deliver(tmp_path, timings, capsys):
    model, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(mlp(), model)
    timings.append([1.00, 0.98])
    assert main([str(model), "--pass", "sparsify:sparsity=0.5", "--gate", "ort", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "speed gate: pass sparsify claims a speedup but runs 1.02x as fast on ort" in err
    assert "--gate-min asks for 1.1x" in err and not out.exists()


def test_gate_prints_the_measured_ratio(tmp_path, timings, capsys):
    model, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(mlp(), model)
    timings.append([2.0, 1.0])
    assert main([str(model), "--pass", "sparsify:sparsity=0.5", "--gate", "ort", "-o", str(out)]) == 0
    assert "speed gate (ort, 1 thread(s), batch 1): 2.00x (2 ms -> 1 ms); sparsify 2.00x" in capsys.readouterr().out


def test_gate_min_zero_only_reports_and_passes_without_a_claim_are_not_measured(timings):
    timings.extend([[1.0, 1.0], [1.0, 1.0]])  # sparsify, then the whole run (two passes)
    _, report = optimize(mlp(), ["cleanup", "sparsify:sparsity=0.5"], gate="ort", gate_min=0.0)
    gate = report["gate"]
    assert [p["name"] for p in gate["passes"]] == ["sparsify"] and gate["ratio"] == 1.0 and not timings


def test_gate_options_are_usage_errors(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(mlp(), model)
    assert main([str(model), "--pass", "cleanup", "--gate-min", "1.2", "-o", str(tmp_path / "o.onnx")]) == 2
    with pytest.raises(Exception, match="--gate-min -1"):
        default_instruments(gate="ort", gate_min=-1)


def test_instruments_see_every_hook_in_order():
    class Recorder(Instrument):
        def __init__(self):
            self.calls = []

        def before_run(self, state):
            self.calls.append("before_run")

        def before_pass(self, state, pass_):
            self.calls.append(f"before {pass_.name}")

        def after_pass(self, state, pass_, result):
            assert state.model is not result.model and state.entry["name"] == pass_.name
            self.calls.append(f"after {pass_.name}")

        def after_run(self, state):
            self.calls.append("after_run")

    recorder = Recorder()
    _, report = optimize(mlp(), ["cleanup", "sparsify"], instruments=[*default_instruments(), recorder])
    assert recorder.calls == ["before_run", "before cleanup", "after cleanup", "before sparsify", "after sparsify",
                              "after_run"]
    assert all({"seconds", "verify", "details"} <= set(entry) for entry in report["passes"])
