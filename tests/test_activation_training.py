"""optimizer.training.activation: WTA dropout and activation thresholds match their definitions, train as intended,
and export to the same ONNX mask pattern, with the same numbers, as the activation-prune pass."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from optimizer.training.activation import (  # noqa: E402
    ActivationThreshold,
    ThresholdSchedule,
    WTADropout,
    activation_density,
)
from optimizer.verify import run_ort  # noqa: E402
from passes import PassContext, get_pass  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def winners_by_loop(x: np.ndarray, keep: float, granularity: str, score: str) -> np.ndarray:
    """Reference written differently from both implementations: per sample, rank units with argsort and keep every
    unit scoring at least the ceil(keep * units)-th best."""
    out = np.zeros_like(x)
    for n, sample in enumerate(x):
        if granularity == "channel" and x.ndim >= 3:
            per_channel = sample.reshape(sample.shape[0], -1)
            scores = per_channel.mean(1, dtype=np.float32) if score == "mean" else per_channel.max(1)
        else:
            scores = sample.ravel()
        k = max(1, math.ceil(keep * scores.size))
        kth = scores[np.argsort(-scores, kind="stable")[k - 1]]
        winners = scores >= kth
        if granularity == "channel" and x.ndim >= 3:
            out[n] = sample * winners[:, None, None]
        else:
            out[n] = (sample.ravel() * winners).reshape(sample.shape)
    return out


@pytest.mark.parametrize(
    ("shape", "keep", "granularity", "score"),
    [((3, 8, 5, 5), 0.25, "channel", "mean"), ((3, 8, 5, 5), 0.5, "channel", "max"),
     ((3, 8, 5, 5), 0.1, "element", "mean"), ((4, 20), 0.3, "channel", "mean")],
    ids=["channel-mean", "channel-max", "element", "rank2"],
)  # fmt: skip
def test_wta_dropout_keeps_the_top_k_of_each_sample(shape, keep, granularity, score):
    x = torch.relu(torch.randn(shape))
    y = WTADropout(keep, granularity=granularity, score=score)(x)
    np.testing.assert_array_equal(y.numpy(), winners_by_loop(x.numpy(), keep, granularity, score))


def test_wta_gradient_flows_only_through_winners():
    x = torch.relu(torch.randn(2, 6, 4, 4)).requires_grad_()
    y = WTADropout(1 / 3)(x)
    y.sum().backward()
    kept = (y != 0).float()
    assert torch.equal(x.grad * (x != 0), kept)
    assert kept.sum() < (x != 0).sum()


def tiny_net(mask=None) -> nn.Sequential:
    """Conv-ReLU-Conv-ReLU-Flatten-Linear-ReLU-Linear on [N, 1, 6, 6], with `mask()` after every ReLU."""
    torch.manual_seed(5)
    layers = [nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
              nn.Linear(216, 12), nn.ReLU(), nn.Linear(12, 3)]  # fmt: skip
    if mask is not None:
        layers = [m for layer in layers for m in ([layer, mask()] if isinstance(layer, nn.ReLU) else [layer])]
    return nn.Sequential(*layers).eval()


def export(model: nn.Module) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 6, 6),), buffer, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}}, opset_version=17, dynamo=False)  # fmt: skip
    return onnx.load_from_string(buffer.getvalue())


def mask_op_types(model: onnx.ModelProto, dense: onnx.ModelProto) -> set[str]:
    """Op types a model has beyond the dense one. Flatten and Reshape count as one; Constant and Identity nodes
    (how the exporter spells initializers and buffers) are ignored."""
    rename = {"Reshape": "Flatten"}
    dense_ops = {rename.get(n.op_type, n.op_type) for n in dense.graph.node}
    ops = {rename.get(n.op_type, n.op_type) for n in model.graph.node} - {"Constant", "Identity"}
    return ops - dense_ops


EQUIVALENT = {
    "wta-channel": (lambda: WTADropout(0.5), {"method": "wta", "keep": 0.5, "granularity": "channel"}),
    "wta-channel-max": (lambda: WTADropout(0.25, score="max"),
                        {"method": "wta", "keep": 0.25, "score": "max", "granularity": "channel"}),
    "wta-element": (lambda: WTADropout(0.2, granularity="element"),
                    {"method": "wta", "keep": 0.2, "granularity": "element"}),
    "threshold": (lambda: ActivationThreshold(0.05), {"method": "threshold", "threshold": 0.05}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(EQUIVALENT))
def test_export_equals_the_pass_on_the_dense_model(case):
    make_mask, options = EQUIVALENT[case]
    x = torch.randn(7, 1, 6, 6)
    dense = export(tiny_net())
    exported = export(tiny_net(make_mask))
    masked, _ = (
        get_pass("activation-prune").from_spec(options).run(dense, PassContext(calibration={"input": x.numpy()}))
    )
    feeds = {"input": x.numpy()}
    (from_training,) = run_ort(exported, feeds).values()
    (from_pass,) = run_ort(masked, feeds).values()
    with torch.no_grad():
        reference = tiny_net(make_mask)(x).numpy()
    np.testing.assert_allclose(from_training, reference, rtol=0, atol=1e-5)
    np.testing.assert_allclose(from_pass, from_training, rtol=0, atol=1e-5)
    assert mask_op_types(exported, dense) == mask_op_types(masked, dense)
    assert not np.allclose(from_pass, run_ort(dense, feeds)["logits"], atol=1e-3)  # the masks do something


def test_learnable_threshold_rises_under_density_penalty():
    module = ActivationThreshold(0.1, learnable=True, temperature=0.1).train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    x = torch.relu(torch.randn(64, 32))
    before = float((module.eval()(x) == 0).float().mean())
    module.train()
    for _ in range(30):
        optimizer.zero_grad()
        module(x)
        activation_density(module).backward()
        optimizer.step()
    assert float(module.threshold.detach()) > 0.3
    after = float((module.eval()(x) == 0).float().mean())
    assert after > before + 0.1


def test_learnable_threshold_trains_the_network_through_the_mask():
    module = ActivationThreshold(0.5, learnable=True).train()
    x = torch.relu(torch.randn(8, 16)).requires_grad_()
    module(x).sum().backward()
    assert module.threshold.grad is not None and float(module.threshold.grad) != 0.0
    assert bool((x.grad[x > 0.5] != 0).all()) and bool((x.grad[x == 0] == 0).all())


def test_threshold_schedule_reaches_the_target_sparsity():
    model = nn.Sequential(nn.ReLU(), ActivationThreshold(0.0))
    schedule = ThresholdSchedule(model, 0.8, steps=20)
    x = torch.randn(256, 64)
    model.train()
    targets = []
    for _ in range(60):
        model(x)
        targets.append(schedule.step())
    assert targets[0] == pytest.approx(0.04) and targets[-1] == 0.8
    sparsity = float((model.eval()(x) == 0).float().mean())
    assert sparsity == pytest.approx(0.8, abs=0.02)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="keep"):
        WTADropout(0.0)
    with pytest.raises(ValueError, match="final_sparsity"):
        ThresholdSchedule(nn.Sequential(ActivationThreshold()), 1.0, steps=5)
