"""Training frontend: DFP QAT and its QDQ export, export metadata, the trainer, torchrun/DDP, and the hand-off to
the structured-sparse pass. Everything trains on a slice of scikit-learn digits in a few seconds, on one thread."""

import json
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from optimizer import quant  # noqa: E402
from optimizer.errors import UsageError  # noqa: E402
from optimizer.training import (  # noqa: E402
    ActivationQuantizer,
    SparsityRegularizer,
    Term,
    TrainConfig,
    Trainer,
    export,
    fake_quantize_ste,
    prepare_qat,
    zero_filters,
)
from optimizer.verify import compare, run_ort  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def digits():
    from samples.digits.digits_cnn import load_split

    return load_split()


def small_cnn(batchnorm: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    norm = nn.BatchNorm2d if batchnorm else (lambda _: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), norm(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), norm(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def test_importing_the_package_does_not_import_torch():
    code = "import sys, optimizer, optimizer.training; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_fake_quantize_ste_is_quant_py_forward_with_straight_through_gradient():
    x = torch.tensor([0.30, -1.26, 0.0117, 2.0], dtype=torch.float32, requires_grad=True)
    fl = quant.frac_length(1.3, 8)  # the range ±127 · 2^-fl does not cover 2.0
    y = fake_quantize_ste(x, 8, fl)
    np.testing.assert_array_equal(y.detach().numpy(), quant.fake_quantize_dfp(x.detach().numpy(), 8, fl))
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [1, 1, 1, 0])  # saturated values get no gradient


def test_activation_quantizer_tracks_a_running_max_and_saturates_like_quantizelinear():
    quantizer = ActivationQuantizer(momentum=0.5)
    with pytest.raises(UsageError, match="seen no data"):
        quantizer.eval()(torch.ones(2))
    quantizer.train()
    quantizer(torch.tensor([0.5, 1.0]))
    quantizer(torch.tensor([-3.0, 1.0]))  # running max 0.5 · 1 + 0.5 · 3 = 2, signed from now on
    assert float(quantizer.running_max) == 2.0 and quantizer.signed
    assert quantizer.frac_length() == 5  # 2 · 2^5 = 64 <= 127 < 128
    out = quantizer.eval()(torch.tensor([-5.0, 0.017, 3.99]))
    np.testing.assert_array_equal(out.numpy(), np.array([-128, 1, 127]) / 32)  # int8 saturates at -128, as ORT


def calibrated_qat_model(digits, granularity: str) -> nn.Module:
    x_train, _, y_train, _ = digits
    model = prepare_qat(small_cnn(), granularity=granularity)
    Trainer(model, TrainConfig(epochs=1, lr=3e-3, progress=False)).fit((x_train[:320], y_train[:320]))
    return model.eval()


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_qat_model_exports_to_qdq_onnx_equal_to_torch(digits, tmp_path, granularity):
    _, x_test, _, _ = digits
    model = calibrated_qat_model(digits, granularity)
    proto = export(model, torch.from_numpy(x_test[:2]), tmp_path / "qat.onnx", output_names=["logits"])
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 17
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 4 and ops.count("DequantizeLinear") == 12  # input, weight, bias per layer
    dtypes = {t.name: t.data_type for t in proto.graph.initializer}
    assert dtypes["0.weight_quantized"] == onnx.TensorProto.INT8
    assert dtypes["0.bias_quantized"] == onnx.TensorProto.INT32
    weights = json.loads({p.key: p.value for p in proto.metadata_props}["sculpt.quant"])["weights"]
    assert weights["0.weight_quantized"]["input_signed"] is False
    assert weights["0.weight_quantized"]["granularity"] == granularity and weights["0.weight_quantized"]["bits"] == 8
    with torch.no_grad():
        expected = model(torch.from_numpy(x_test)).numpy()
    got = run_ort(onnx.load(tmp_path / "qat.onnx"), {"input": x_test})["logits"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_exported_weights_are_quant_py_codes(digits, tmp_path):
    model = calibrated_qat_model(digits, "channel")
    proto = export(model, torch.zeros(2, 1, 8, 8), tmp_path / "qat.onnx")
    codes = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "3.weight_quantized"))
    weight = model[3].weight.detach().double().numpy()
    fl = quant.frac_length(np.abs(weight).reshape(16, -1).max(1), 8).reshape(-1, 1, 1, 1)
    assert codes.dtype == np.int8
    np.testing.assert_array_equal(codes, quant.quantize_dfp(weight, 8, fl))


def test_export_writes_opset17_group_metadata_and_matches_torch(digits, tmp_path):
    _, x_test, _, _ = digits
    model = small_cnn().eval()
    reg = SparsityRegularizer(model, Term("group_hoyer_square", 1e-3, layers=(nn.Conv2d,)))
    proto = export(model, torch.from_numpy(x_test[:1]), tmp_path / "m.onnx", regularizer=reg,
                   metadata={"model": "digits-cnn", "sculpt.note": {"epochs": 0}})
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(metadata["sculpt.regularizer"])[0]["kind"] == "group_hoyer_square"
    groups = json.loads(metadata["sculpt.groups"])
    initializers = {t.name for t in proto.graph.initializer}
    assert groups["0"]["attached"] == ["0.bias", "1.weight", "1.bias"]
    assert all(name in initializers for g in groups.values() for name in [g["weight"], *g["attached"]])
    assert metadata["sculpt.model"] == "digits-cnn" and json.loads(metadata["sculpt.note"]) == {"epochs": 0}
    with torch.no_grad():
        expected = model(torch.from_numpy(x_test)).numpy()
    got = run_ort(onnx.load(tmp_path / "m.onnx"), {"input": x_test})["output"]  # batch axis is dynamic
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError):
        export(model, "not a tensor", tmp_path / "bad.onnx")


def test_trainer_threshold_then_finetune_keeps_its_zeros(digits):
    x_train, x_test, y_train, y_test = digits
    model = small_cnn()
    reg = SparsityRegularizer(model, Term("group_hoyer_square", 3e-2))
    trainer = Trainer(model, TrainConfig(epochs=3, lr=3e-3, progress=False), regularizer=reg)
    history = trainer.fit((x_train, y_train), eval_data=(x_test, y_test))
    assert [r["epoch"] for r in history] == [1, 2, 3] and history[-1]["penalty"] > 0
    masks = trainer.threshold_then_finetune(
        (x_train, y_train), std_ratio=0.5, groups=("element",), finetune=TrainConfig(epochs=1, lr=1e-3, progress=False)
    )
    assert trainer.history[-1]["penalty"] == 0  # fine-tuning runs without the regularizer
    for _, param, mask in masks.entries:
        assert torch.all(param[mask == 0] == 0)
    assert masks.zero_fraction() > 0.3
    assert trainer.evaluate((x_test, y_test)) > 0.85


WORKER = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from optimizer.training import SparsityRegularizer, Term, TrainConfig, Trainer

    def train(out_dir):
        torch.set_num_threads(1)
        generator = torch.Generator().manual_seed(0)
        inputs = torch.rand(128, 64, generator=generator)
        data = (inputs, (inputs[:, :10] + inputs[:, 10:20]).argmax(1))  # a learnable synthetic task
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
        reg = SparsityRegularizer(model, Term("l1", 1e-3))
        trainer = Trainer(model, TrainConfig(epochs=2, batch_size=32, lr=1e-2, progress=False), regularizer=reg)
        trainer.fit(data)
        result = {"state": model.state_dict(), "world": trainer.world, "accuracy": trainer.evaluate(data),
                  "loss": trainer.history[-1]["loss"]}
        torch.save(result, f"{out_dir}/rank{trainer.rank}.pt")
        trainer.close()

    if __name__ == "__main__":
        train(sys.argv[1])
    """
)


def test_torchrun_two_gloo_processes_train_like_one(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
               str(tmp_path)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    runpy.run_path(str(worker))["train"](single_dir)
    single = torch.load(single_dir / "rank0.pt")
    assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1
    for name, value in single["state"].items():
        torch.testing.assert_close(ranks[0]["state"][name], ranks[1]["state"][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-5, atol=1e-6)
    assert ranks[0]["accuracy"] == ranks[1]["accuracy"] == single["accuracy"]
    assert ranks[0]["loss"] == pytest.approx(single["loss"], rel=1e-5)


def hidden_channels(model: onnx.ModelProto) -> int:
    """Output channels of every Conv/Gemm but the last (whose outputs are the graph's)."""
    initializers = {t.name: t for t in model.graph.initializer}
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    return sum(initializers[n.input[1]].dims[0] for n in layers[:-1])


def test_group_lasso_cnn_loses_half_its_channels_in_structured_sparse(digits, tmp_path):
    import optimizer
    from passes import all_passes

    if "structured-sparse" not in all_passes():
        pytest.skip("the structured-sparse pass is not registered yet")
    x_train, x_test, y_train, y_test = digits
    model = small_cnn(batchnorm=False)  # SSL's setting: with BatchNorm, group Lasso can shrink a layer for free
    producers, consumers = r"^(0|3|8)$", r"^(3|8|10)$"  # no channel groups on the image, no filters on the logits
    reg = SparsityRegularizer(model, [Term("group_lasso", 3e-2, name=producers, groups=("filter",)),
                                      Term("group_lasso", 3e-2, name=consumers, groups=("channel",))])
    trainer = Trainer(model, TrainConfig(epochs=8, lr=1e-2, schedule="cosine", progress=False), regularizer=reg)
    trainer.fit((x_train, y_train), config=TrainConfig(epochs=3, lr=1e-2, progress=False, regularizer_weight=0))
    trainer.fit((x_train, y_train))
    trainer.threshold_then_finetune((x_train, y_train), std_ratio=0.3, groups=("filter", "channel"),
                                    finetune=TrainConfig(epochs=3, lr=1e-3, progress=False))
    assert trainer.evaluate((x_test, y_test)) > 0.9
    assert zero_filters(model[0].weight) > 0
    dense = export(model, torch.from_numpy(x_test[:2]), tmp_path / "gl.onnx", regularizer=reg)
    pruned, report = optimizer.optimize(tmp_path / "gl.onnx", passes=["structured-sparse:criterion=zero"],
                                        calibration={"input": x_test})
    assert hidden_channels(pruned) <= 0.5 * hidden_channels(dense)
    error = compare(run_ort(dense, {"input": x_test}), run_ort(pruned, {"input": x_test}))
    assert error["max_rel_err"] <= 1e-4 and error["top1_agreement"] == 1.0


def test_export_module_and_function_are_both_callable():
    import importlib

    import optimizer.training

    module = importlib.import_module("optimizer.training.export")
    assert callable(module) and callable(optimizer.training.export)
