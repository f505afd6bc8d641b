"""The reram runtime on the digits CNN: the quantized CNN equals its QDQ form on ONNX Runtime, the float CNN keeps
its accuracy, and the ADC sweep behaves (accuracy up and saturation down with ADC bits)."""

import json
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import runtimes
from optimizer.cli import main
from optimizer.pipeline import optimize


@pytest.fixture(scope="module")
def digits(digits_assets):
    model = onnx.load(str(digits_assets.model))
    calibration = dict(np.load(digits_assets.calibration))
    evaluation = dict(np.load(digits_assets.eval))
    quantized, _ = optimize(model, passes=["cleanup", "quantize"], calibration=calibration)
    return model, quantized, calibration, evaluation


def ort_logits(model, x, optimized=True):
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options).run(None, {"input": x})[0]


def test_quantized_cnn_gives_the_logits_of_its_qdq_form_on_onnx_runtime(digits):
    _, quantized, _, evaluation = digits
    x, labels = evaluation["input"], evaluation["labels"]
    start = time.perf_counter()
    reference = ort_logits(quantized, x, optimized=False)
    ort_seconds = time.perf_counter() - start
    session = runtimes.load("reram", quantized)
    start = time.perf_counter()
    logits = session.run({"input": x})["logits"]
    reram_seconds = time.perf_counter() - start
    print(f"\ndigits test split ({len(x)} images): onnxruntime {ort_seconds:.3f} s, reram {reram_seconds:.3f} s")
    np.testing.assert_allclose(logits, reference, rtol=1e-6, atol=1e-6)
    described = session.describe()
    assert described["saturated_conversions"] == 0
    assert [layer["weights"] for layer in described["layers"]] == ["qdq"] * 5
    assert np.mean(logits.argmax(1) == labels) == np.mean(reference.argmax(1) == labels)


def test_float_cnn_is_quantized_internally_and_keeps_its_accuracy(digits):
    model, _, calibration, evaluation = digits
    described = runtimes.load("reram", model, calibration=calibration).evaluate(evaluation)
    reference = np.mean(ort_logits(model, evaluation["input"]).argmax(1) == evaluation["labels"])
    assert described["accuracy"] >= reference - 0.01
    assert described["digital"]["ops"].get("BatchNormalization") == 3  # not folded: runs digitally
    assert described["energy_pj"]["total"] > 0 and described["latency_ns"] > 0


def test_sweep_accuracy_rises_and_saturation_falls_with_adc_bits(digits, tmp_path):
    _, quantized, _, evaluation = digits
    model_path, eval_path = tmp_path / "q.onnx", tmp_path / "eval.npz"
    onnx.save(quantized, model_path)
    np.savez(eval_path, input=evaluation["input"][:60], labels=evaluation["labels"][:60])
    plot, report = tmp_path / "sweep.png", tmp_path / "sweep.json"
    argv = ["reram-sweep", str(model_path), "--eval", str(eval_path), "--adc-bits", "2,4,9", "--plot", str(plot),
            "--report", str(report)]
    assert main(argv) == 0
    result = json.loads(report.read_text())["reram_sweep"]
    accuracy = [p["accuracy"] for p in result["points"]]
    saturation = [p["saturation_rate"] for p in result["points"]]
    assert accuracy == sorted(accuracy) and saturation == sorted(saturation, reverse=True)
    assert saturation[0] > 0 and saturation[-1] == 0
    assert accuracy[-1] == result["integer_baseline"] == result["ort_accuracy"]
    image = __import__("matplotlib.image", fromlist=["imread"]).imread(plot)
    assert image.shape[0] > 300 and image.shape[1] > 500 and image[..., :3].std() > 0.05


def test_noisy_cnn_is_reproducible_per_seed(digits):
    _, quantized, _, evaluation = digits
    x = evaluation["input"][:8]
    noise = {"variation": 0.05, "read_noise": 0.01, "stuck_at": 0.001, "on_off": 100}
    first = runtimes.load("reram", quantized, seed=4, **noise).run({"input": x})["logits"]
    again = runtimes.load("reram", quantized, seed=4, **noise).run({"input": x})["logits"]
    other = runtimes.load("reram", quantized, seed=5, **noise).run({"input": x})["logits"]
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    quiet = [runtimes.load("reram", quantized, seed=s).run({"input": x})["logits"] for s in (4, 5)]
    assert np.array_equal(quiet[0], quiet[1])
