"""`optimize sweep`: specs, the product order, failures as data, Ctrl-C, the Pareto front, and one local Ray run
that must give the in-process results point for point."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml

from optimizer.cli import main
from optimizer.errors import UsageError
from optimizer.sweep import load_spec, pareto_front, ranking, run, substitute, without_timings
from optimizer.sweep.engine import execute, run_point
from passes import PassContext
from passes.structured_sparse import StructuredSparse

CRITERIA = ["l1", "l2", "hoyer", "bn-scale"]
RATIOS = [0.25, 0.5, 0.75]


def write_spec(directory, digits, **keys):
    """A spec beside copies of the digits files, so that its relative paths are tested."""
    for name in ("model", "calibration", "eval"):
        source = getattr(digits, name)
        (directory / source.name).write_bytes(source.read_bytes())
    spec = {"model": digits.model.name, "calibration": digits.calibration.name, "eval": digits.eval.name, **keys}
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def top1_on_ort(model: onnx.ModelProto, evaluation) -> float:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": evaluation["input"]})[0]
    return float(np.mean(logits.argmax(1) == evaluation["labels"]))


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray with 2 CPUs for the module, started the way `--workers 2` starts it."""
    from optimizer.sweep.engine import import_ray, start_ray

    ray = import_ray()
    start_ray(ray, 2, None)
    yield ray
    ray.shutdown()


def test_twelve_points_give_the_same_results_on_one_worker_and_on_two_ray_workers(digits_assets, tmp_path, capsys,
                                                                                  local_ray):
    spec = write_spec(tmp_path, digits_assets, passes=["structured-sparse:ratio={ratio},criterion={criterion}"],
                      axes={"ratio": RATIOS, "criterion": CRITERIA}, objective="accuracy")
    reports = {}
    for workers in (1, 2):
        reports[workers] = tmp_path / f"w{workers}.json"
        argv = ["sweep", str(spec), "--workers", str(workers), "--report", str(reports[workers])]
        assert main([*argv, *(["--plot", str(tmp_path / "front.png")] if workers == 1 else [])]) == 0
    one, two = (json.loads(reports[w].read_text()) for w in (1, 2))
    assert (one["backend"], two["workers"]) == ("in-process", 2) and two["backend"].endswith("ray")
    assert [p["params"] for p in one["points"]] == [{"ratio": r, "criterion": c} for r in RATIOS for c in CRITERIA]
    assert without_timings(one["points"]) == without_timings(two["points"])
    assert one["pareto"] == two["pareto"] and all(p["ok"] for p in one["points"])

    # each point is the normal pipeline run: the same accuracy as the pass applied alone, scored on ORT
    evaluation = dict(np.load(digits_assets.eval))
    context = PassContext(calibration=dict(np.load(digits_assets.calibration)), calibration_is_random=False)
    source = onnx.load(digits_assets.model)
    for point in one["points"][4:8]:
        pruned, _ = StructuredSparse.from_spec(point["params"]).run(source, context)
        assert point["accuracy"] == pytest.approx(top1_on_ort(pruned, evaluation), abs=1e-9)
        assert point["report"]["passes"][0]["name"] == "structured-sparse"
        assert point["report"]["output"]["macs"] == point["macs"] < point["report"]["input"]["macs"]
    macs = {p["params"]["ratio"]: p["macs"] for p in one["points"] if p["params"]["criterion"] == "l1"}
    assert macs[0.25] > macs[0.5] > macs[0.75]

    accuracies = [p["accuracy"] for p in one["points"]]
    table = capsys.readouterr().out
    best = one["points"][int(np.argmax(accuracies))]
    assert table.index(f"{best['accuracy']:.4f}") < table.index(f"{min(accuracies):.4f}")
    front = one["pareto"]["points"]
    assert one["pareto"]["x"] == "macs" and front == pareto_front(one["points"], "macs")
    image = __import__("matplotlib.image", fromlist=["imread"]).imread(tmp_path / "front.png")
    assert image.shape[0] > 300 and image[..., :3].std() > 0.05


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "ray"])
def test_a_point_with_an_invalid_option_fails_alone_and_is_reported(digits_assets, tmp_path, capsys, workers,
                                                                    request, monkeypatch):
    puts = []
    if workers > 1:  # the model and data go to the object store once, not once per point
        ray = request.getfixturevalue("local_ray")
        put = ray.put
        monkeypatch.setattr(ray, "put", lambda value, **kw: puts.append(type(value).__name__) or put(value, **kw))
    points = [{"ratio": 0.5, "criterion": "l1"}, {"ratio": 0.5, "criterion": "magnitude"},
              {"ratio": 0.25, "criterion": "l2"}]
    spec = write_spec(tmp_path, digits_assets, passes=["structured-sparse:ratio={ratio},criterion={criterion}"],
                      points=points)
    report = tmp_path / "r.json"
    assert main(["sweep", str(spec), "--workers", str(workers), "--report", str(report)]) == 1
    result = json.loads(report.read_text())
    assert [p["ok"] for p in result["points"]] == [True, False, True]
    failed = result["points"][1]
    assert failed["params"] == points[1] and "criterion" in failed["error"] and "magnitude" in failed["error"]
    assert set(failed) == {"params", "ok", "error", "seconds"}
    captured = capsys.readouterr()
    assert "failed" in captured.out and "magnitude" in captured.err
    assert ranking(result["points"], "accuracy")[-1] == 1
    assert sorted(puts) == ([] if workers == 1 else ["PipelineTask", "SweepInputs"])


def test_axes_expand_in_product_order_with_ranges_and_typed_substitution(tmp_path):
    spec = load_spec({"axes": {"bits": {"range": [2, 8, 3]}, "ratio": {"range": [0.1, 0.5, 0.2]}, "seed": 7}},
                     custom_task=True)
    assert [tuple(p.values()) for p in spec.points] == [
        (b, r, 7) for b in (2, 5, 8) for r in (0.1, 0.3, 0.5)]
    assert substitute(["a:x={bits},y={ratio}", {"adc_bits": "{bits}"}], {"bits": 4, "ratio": 0.3}) == \
        ["a:x=4,y=0.3", {"adc_bits": 4}]


def test_spec_mistakes_are_usage_errors_naming_the_key(digits_assets, tmp_path):
    cases = {
        "typo": ({"passes": ["structured-sparse:ratio={ratoi}"], "axes": {"ratio": [0.5]}}, "ratoi"),
        "unused": ({"passes": ["cleanup"], "axes": {"ratio": [0.5]}}, "appears in no pass"),
        "both": ({"passes": ["cleanup"], "axes": {"a": [1]}, "points": [{"a": 1}]}, "not both"),
        "key": ({"passes": ["cleanup"], "axis": {"a": [1]}}, "unknown key 'axis'"),
        "objective": ({"passes": ["cleanup"], "objective": "speed"}, "objective 'speed'"),
        "range": ({"passes": ["c:x={a}"], "axes": {"a": {"range": [3, 1]}}}, "first <= last"),
    }
    for name, (keys, message) in cases.items():
        spec = write_spec(tmp_path, digits_assets, **keys)
        with pytest.raises(UsageError, match=message):
            load_spec(spec)
        assert main(["sweep", str(spec)]) == 2, name
    missing = tmp_path / "elsewhere.yaml"
    missing.write_text("model: nope.onnx\npasses: [cleanup]\n")
    with pytest.raises(UsageError, match=str(tmp_path / "nope.onnx")):
        load_spec(missing)


def test_ctrl_c_stops_the_sweep_and_the_finished_points_are_written(digits_assets, tmp_path, monkeypatch, capsys):
    import optimizer.sweep.engine as engine

    spec = write_spec(tmp_path, digits_assets, passes=["structured-sparse:ratio={ratio}"],
                      axes={"ratio": [0.25, 0.5, 0.75, 0.9]})
    calls = []

    def interrupted_at_the_third(task, inputs, params):
        calls.append(params)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return run_point(task, inputs, params)

    monkeypatch.setattr(engine, "run_point", interrupted_at_the_third)
    report = tmp_path / "r.json"
    assert main(["sweep", str(spec), "--report", str(report)]) == 130
    result = json.loads(report.read_text())
    assert result["interrupted"] and (result["finished"], result["total"]) == (2, 4)
    assert [p["params"]["ratio"] for p in result["points"]] == [0.25, 0.5]
    assert "2 of 4 points finished" in capsys.readouterr().err


def test_pareto_front_and_ranking_on_hand_cases():
    points = [
        {"ok": True, "accuracy": 0.90, "energy_pj": 30.0},
        {"ok": True, "accuracy": 0.95, "energy_pj": 50.0},
        {"ok": True, "accuracy": 0.85, "energy_pj": 40.0},   # worse than point 0 on both
        {"ok": False, "error": "x"},
        {"ok": True, "accuracy": 0.90, "energy_pj": 30.0},   # ties point 0: both stay
        {"ok": True, "accuracy": 0.60, "energy_pj": 10.0},
    ]
    assert pareto_front(points, "energy_pj") == [5, 0, 4, 1]
    assert ranking(points, "accuracy") == [1, 0, 4, 2, 5, 3]
    assert ranking(points, "energy_pj") == [5, 0, 4, 2, 1, 3]


def accuracy_of_strength(inputs, params):
    """A stand-in for a training run: module level, so Ray could ship it."""
    if params["strength"] < 0:
        raise ValueError("negative strength")
    return {"accuracy": inputs["base"] - params["strength"], "model_params": 100}


def test_python_api_runs_a_custom_task_over_the_spec_axes():
    result = run({"axes": {"strength": [0.1, -1.0, 0.2]}}, task=accuracy_of_strength, inputs={"base": 1.0})
    assert [p.get("accuracy") for p in result["points"]] == [0.9, None, 0.8]
    assert result["points"][1]["error"] == "ValueError: negative strength"
    outcome = execute(accuracy_of_strength, [{"strength": 0.5}], {"base": 2.0})
    assert outcome.results[0]["accuracy"] == 1.5 and not outcome.interrupted


def test_sensitivity_and_reram_sweep_run_their_trials_on_the_same_engine(digits_assets, local_ray):
    from optimizer.pipeline import optimize
    from optimizer.sensitivity import sensitivity
    from runtimes.reram.sweep import sweep

    model = onnx.load(digits_assets.model)
    evaluation = {k: v[:120] for k, v in np.load(digits_assets.eval).items()}
    here = sensitivity(model, evaluation, ratios=(0.5, 0.75))
    assert sensitivity(model, evaluation, ratios=(0.5, 0.75), workers=2) == here
    assert [len(row["ratios"]) for row in here["groups"]] == [2] * 4 and here["groups"][0]["ratios"]["0.75"]["drop"] > 0

    quantized, _ = optimize(model, ["cleanup", "quantize"], calibration=dict(np.load(digits_assets.calibration)))
    options = {"variation": "0.05", "seed": "3"}
    points = sweep(quantized, evaluation, adc_bits=[3, 8], options=options, per_slice=[(1, 3, 3, 3)])
    assert sweep(quantized, evaluation, adc_bits=[3, 8], options=options, per_slice=[(1, 3, 3, 3)], workers=2) == points
    assert points["points"][0]["saturation_rate"] > points["points"][1]["saturation_rate"] == 0
    per_slice = points["points"][2]
    assert per_slice["adc_bits"] == [1, 3, 3, 3] and len(per_slice["saturated_by_slice_msb_first"]) == 4


def test_sweep_imports_ray_only_when_points_go_to_ray():
    import subprocess
    import sys

    code = ("import sys; from optimizer.cli import main; import optimizer.sweep; code = main(['sweep', '--help']); "
            "print(code, *(name in sys.modules for name in ('ray', 'torch', 'passes', 'runtimes')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "0 False False False False"
    assert "--workers" in result.stdout and "--address" in result.stdout


def slow_square(inputs, params):
    import time

    time.sleep(params["x"] * inputs)
    return {"accuracy": params["x"] ** 2}


def test_ctrl_c_on_ray_cancels_the_running_points_and_keeps_the_finished(local_ray):
    def interrupt_after_the_first(index, result, finished, total):
        raise KeyboardInterrupt

    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test module
    points = [{"x": x} for x in (0, 30, 30, 30)]
    outcome = execute(slow_square, points, 1.0, workers=2, on_result=interrupt_after_the_first)
    assert outcome.interrupted and outcome.results[0] == {"params": {"x": 0}, "ok": True, "accuracy": 0,
                                                          "seconds": outcome.results[0]["seconds"]}
    assert outcome.results[1:] == [None, None, None]
    assert local_ray.is_initialized()  # a Ray this process started itself stays up for its owner


def test_reram_runtime_points_report_emulator_accuracy_and_energy(digits_assets, tmp_path):
    import runtimes
    from optimizer.pipeline import optimize

    quantized, _ = optimize(onnx.load(digits_assets.model), ["cleanup", "quantize"],
                            calibration=dict(np.load(digits_assets.calibration)))
    onnx.save(quantized, tmp_path / "q.onnx")
    evaluation = {k: v[:60] for k, v in np.load(digits_assets.eval).items()}
    np.savez(tmp_path / "e.npz", **evaluation)
    spec = {"model": "q.onnx", "eval": "e.npz", "runtime": "reram",
            "runtime_options": {"adc_bits": "{bits}", "variation": 0.05, "seed": "{seed}"},
            "axes": {"seed": [1], "bits": [3, 8]}}
    result = run(spec_file(tmp_path, spec))
    assert result["pareto"]["x"] == "energy_pj"
    for point in result["points"]:
        session = runtimes.load("reram", quantized, adc_bits=point["params"]["bits"], variation=0.05, seed=1,
                                threads=1)
        described = session.evaluate(evaluation)
        assert point["accuracy"] == described["accuracy"]
        assert point["energy_pj"] == pytest.approx(described["energy_pj"]["total"], rel=1e-12)
    low, high = result["points"]
    assert low["saturation_rate"] > 0 == high["saturation_rate"] and low["energy_pj"] < high["energy_pj"]


def test_bench_points_measure_latency_and_the_front_uses_it(digits_assets, tmp_path):
    spec = write_spec(tmp_path, digits_assets, passes=["structured-sparse:ratio={ratio},criterion=l1,recover=none"],
                      axes={"ratio": [0.25, 0.75]}, bench={"runs": 3, "warmup": 1}, objective="latency_ms")
    result = run(spec)
    assert result["pareto"]["x"] == "latency_ms"
    for point in result["points"]:
        assert point["latency_ms"] == point["report"]["bench"]["median_ms"] > 0
        assert (point["report"]["bench"]["threads"], point["report"]["bench"]["runtime"]) == (1, "ort")
    assert ranking(result["points"], "latency_ms")[0] == int(np.argmin([p["latency_ms"] for p in result["points"]]))


def spec_file(directory, spec):
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
