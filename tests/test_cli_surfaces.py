"""What the terminal shows: the structured-sparse group table, the reram cost summary, bench rows that survive."""

import json

import numpy as np
import onnx
import pytest

from optimizer.cli import main
from tests.test_honest_verification import _mlp


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    onnx.save(_mlp(), "m.onnx")
    np.savez("x.npz", x=np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    return tmp_path


def test_structured_sparse_prints_the_group_table(work, capsys):
    assert main(["m.onnx", "--pass", "structured-sparse:ratio=0.5", "-o", "s.onnx", "--min-agreement", "0",
                 "--min-cosine", "0", "--report", "r.json"]) == 0
    out = capsys.readouterr().out
    assert "structured-sparse: channel groups" in out
    groups = json.loads((work / "r.json").read_text())["passes"][0]["details"]["groups"]
    assert {g["status"] for g in groups} == {"pruned", "declined"}
    for group in groups:
        row = next(line for line in out.splitlines() if line.startswith(f"│ {group['name']} "))
        assert group["status"] in row and f"{group['channels_before']} → {group['channels_after']}" in row
    assert "graph output y: a graph output keeps its shape" in out
    assert "32 → 16" in out


def test_long_group_tables_are_folded_with_a_count(capsys):
    from optimizer.console import print_groups

    groups = [{"name": f"g{i}", "status": "unchanged" if i % 3 else "pruned", "channels_before": 8,
               "channels_after": 8 if i % 3 else 4, "members": [{"node": f"n{i}", "tensor": "t"}]} for i in range(30)]
    print_groups("structured-sparse", groups, limit=5)
    out = capsys.readouterr().out
    assert out.count("│ g") == 5 and "… and 25 more groups (5 pruned, 20 unchanged)" in out
    assert all(f"│ g{i} " in out for i in (0, 3, 6, 9, 12))  # pruned groups are shown first


def test_run_on_reram_prints_the_cost_summary(work, capsys):
    assert main(["run", "m.onnx", "--input", "x.npz", "--output", "y.npz", "--runtime", "reram",
                 "--report", "r.json"]) == 0
    out = capsys.readouterr().out
    described = json.loads((work / "r.json").read_text())["reram"]
    summary = next(line for line in out.splitlines() if line.startswith("reram cost"))
    assert f"energy {described['energy_pj']['total'] / 1e6:.6g} uJ" in summary
    assert f"latency {described['latency_ns'] / 1e3:.6g} us" in summary
    assert f"area {described['area_mm2']:.4g} mm2" in out
    assert f"ADC: {described['adc_conversions']:,} conversions" in out
    assert described["energy_pj"]["total"] > 0 and described["latency_ns"] > 0


def test_bench_keeps_the_rows_that_worked_when_a_runtime_fails(work, capsys, monkeypatch):
    """The reram runtime fails to load the second model (a RuntimeFailure at the runtime boundary, as a compile
    or import failure would be); its row says why and the three other rows are timed."""
    import runtimes
    from optimizer.errors import RuntimeFailure

    onnx.save(_mlp(hidden=16), "small.onnx")
    real_load = runtimes.load

    def load(name, model, **options):
        if name == "reram" and model.graph.initializer[0].dims[1] == 16:
            raise RuntimeFailure("runtime reram: cannot map layer fc1 (simulated failure)")
        return real_load(name, model, **options)

    monkeypatch.setattr(runtimes, "load", load)
    code = main(["bench", "m.onnx", "small.onnx", "--runtime", "ort", "--runtime", "reram", "--runs", "3",
                 "--warmup", "1", "--report", "b.json"])
    assert code == 1  # a runtime failed
    captured = capsys.readouterr()
    results = json.loads((work / "b.json").read_text())["results"]
    assert [(r["model"], r["runtime"], "error" in r) for r in results] == [
        ("m.onnx", "ort", False), ("m.onnx", "reram", False), ("small.onnx", "ort", False),
        ("small.onnx", "reram", True)]
    assert results[3]["error"] == "runtime reram: cannot map layer fc1 (simulated failure)"
    assert all(r["median_ms"] > 0 and r["rss_delta_mb"] >= 0 for r in results[:3])
    assert results[0]["ratio"] == 1.0
    assert results[2]["ratio"] == pytest.approx(results[2]["median_ms"] / results[0]["median_ms"])
    assert results[1]["reram"]["energy_pj"]["total"] > 0
    assert "failed" in captured.out and captured.out.count("│ m.onnx") == 2 and captured.out.count("│ small.onnx") == 2
    assert "bench: loading small.onnx on reram…" in captured.err
    assert captured.err.strip().splitlines()[-1].startswith("error: 1 of 4 bench rows failed")
