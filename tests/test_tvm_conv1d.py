"""1-D convolutions on the tvm runtime's scheduled kernels (conv2d of height 1), against ONNX Runtime: stride,
padding, dilation, groups, residual, dense and block-sparse, batch 1 and 8; a TDNN with statistics pooling; and
the conv kernel's padded rows (a pixel count the register tile does not divide) against numpy."""

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import runtimes
from optimizer.data import random_inputs
from passes import PassContext
from passes.sparsify import Sparsify

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tvm") is None, reason="apache-tvm is not installed")

RELATIVE_TOLERANCE = 1e-4
CONV1D_NODES = {"strided", "dilated_grouped", "depthwise", "asymmetric"}
TDNN_NODES = {f"frame{i}" for i in range(1, 6)}


def _weight(rng, name, *shape, scale=0.3):
    return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name)


def _model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, initializers), opset_imports=[helper.make_opsetid("", 17)]
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def conv1d_model() -> onnx.ModelProto:
    """x[N, 6, 21]: Conv1d with stride and padding, dilation with groups, depthwise, asymmetric padding with a
    residual add, then mean over time and a Gemm."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "k1", "c1"], ["a1"], name="strided", strides=[2], pads=[1, 1]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("Conv", ["r1", "k2"], ["a2"], name="dilated_grouped", dilations=[2], pads=[2, 2], group=2),
        helper.make_node("Conv", ["a2", "k3", "c3"], ["a3"], name="depthwise", pads=[1, 1], group=16),
        helper.make_node("Conv", ["a3", "k4", "c4"], ["a4"], name="asymmetric", pads=[1, 0]),
        helper.make_node("Add", ["a4", "a3"], ["s4"]),
        helper.make_node("Relu", ["s4"], ["r4"]),
        helper.make_node("ReduceMean", ["r4"], ["m"], axes=[2], keepdims=0),
        helper.make_node("Gemm", ["m", "w5", "c5"], ["y"], name="fc", transB=1),
    ]
    initializers = [
        _weight(rng, "k1", 16, 6, 3),
        _weight(rng, "c1", 16),
        _weight(rng, "k2", 16, 8, 3),
        _weight(rng, "k3", 16, 1, 3),
        _weight(rng, "c3", 16),
        _weight(rng, "k4", 16, 16, 2),
        _weight(rng, "c4", 16),
        _weight(rng, "w5", 10, 16),
        _weight(rng, "c5", 10),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 21])
    return _model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], initializers)


def tdnn_model(frames: int = 40) -> onnx.ModelProto:
    """An x-vector TDNN in miniature: dilated frame layers (kernel 5/3/3/1/1, dilation 1/2/3/1/1) with ReLU,
    statistics pooling (mean, sqrt(clip(E[x^2] - mean^2, floor))), two Gemm segment layers.
    60 pooled channels: not a multiple of the vector width."""
    rng = np.random.default_rng(5)
    widths, contexts = (24, 32, 32, 32, 60), ((5, 1), (3, 2), (3, 3), (1, 1), (1, 1))
    nodes, initializers, previous, width = [], [], "features", 12
    for i, (out, (kernel, dilation)) in enumerate(zip(widths, contexts, strict=True), start=1):
        initializers += [_weight(rng, f"k{i}", out, width, kernel, scale=0.5), _weight(rng, f"c{i}", out)]
        nodes += [
            helper.make_node("Conv", [previous, f"k{i}", f"c{i}"], [f"a{i}"], name=f"frame{i}", dilations=[dilation]),
            helper.make_node("Relu", [f"a{i}"], [f"h{i}"]),
        ]
        previous, width = f"h{i}", out
    nodes += [
        helper.make_node("ReduceMean", [previous], ["mean"], axes=[2], keepdims=0),
        helper.make_node("Mul", [previous, previous], ["square"]),
        helper.make_node("ReduceMean", ["square"], ["mean_square"], axes=[2], keepdims=0),
        helper.make_node("Mul", ["mean", "mean"], ["mean2"]),
        helper.make_node("Sub", ["mean_square", "mean2"], ["variance"]),
        helper.make_node("Clip", ["variance", "floor"], ["clamped"]),  # torch.clamp(min=) exports this
        helper.make_node("Sqrt", ["clamped"], ["std"]),
        helper.make_node("Concat", ["mean", "std"], ["stats"], axis=1),
        helper.make_node("Gemm", ["stats", "w6", "c6"], ["segment6"], name="segment6", transB=1),
        helper.make_node("Relu", ["segment6"], ["r6"]),
        helper.make_node("Gemm", ["r6", "w7", "c7"], ["embedding"], name="segment7", transB=1),
    ]
    initializers += [
        _weight(rng, "w6", 24, 120),
        _weight(rng, "c6", 24),
        _weight(rng, "w7", 16, 24),
        _weight(rng, "c7", 16),
        numpy_helper.from_array(np.float32(1e-8), "floor"),
    ]
    x = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 12, frames])
    y = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 16])
    return _model(nodes, [x], [y], initializers)


def _feeds(model: onnx.ModelProto, batch: int) -> dict[str, np.ndarray]:
    return random_inputs(model, batch, seed=batch)


def _assert_matches_ort(model, session, feeds):
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    actual = session.run(feeds)
    for want, got in zip(expected, actual.values(), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert np.abs(got - want).max() <= RELATIVE_TOLERANCE * np.abs(want).max()


def _layers(session) -> dict[str, dict]:
    facts = session.describe()
    assert facts["untouched"] == []  # no conv left to TVM's default lowering
    return {layer["name"]: layer for layer in facts["layers"]}


@pytest.mark.parametrize("batch", [1, 8])
def test_conv1d_with_stride_padding_dilation_groups_matches_ort(batch):
    model = conv1d_model()
    session = runtimes.load("tvm", model, batch=batch, threads=1, cache=False)
    _assert_matches_ort(model, session, _feeds(model, batch))
    layers = _layers(session)
    ops = {name: layer["op"] for name, layer in layers.items()}
    assert ops == {**dict.fromkeys(CONV1D_NODES, "conv1d"), "fc": "matmul"}
    assert {layers[name]["kernel"] for name in CONV1D_NODES} == {"dense"}
    assert layers["strided"]["fused"] == "bias+relu"
    assert layers["asymmetric"]["fused"] == "bias+residual+relu"
    rows = batch * 11  # strided: (21 + 2 - 3) // 2 + 1 output frames per utterance
    assert layers["strided"]["gemm"] == f"{rows}x18x16"


@pytest.mark.parametrize("batch", [1, 8])
def test_block_sparse_conv1d_matches_ort(batch):
    model = Sparsify(Sparsify.Options(sparsity=0.5, pattern="8x1")).run(conv1d_model(), PassContext()).model
    session = runtimes.load("tvm", model, batch=batch, threads=1, sparse="always", block="8x1", cache=False)
    _assert_matches_ort(model, session, _feeds(model, batch))
    layers = _layers(session)
    assert {name for name, layer in layers.items() if layer["kernel"] == "bsr"} == {"strided", "asymmetric", "fc"}
    assert layers["asymmetric"]["block_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert layers["asymmetric"]["fused"] == "bias+residual+relu"
    assert "groups" in layers["depthwise"]["reason"] and "groups" in layers["dilated_grouped"]["reason"]


@pytest.mark.parametrize("batch", [1, 8])
def test_tdnn_with_statistics_pooling_matches_ort(batch):
    model = tdnn_model()
    session = runtimes.load("tvm", model, batch=batch, threads=1, cache=False)
    _assert_matches_ort(model, session, _feeds(model, batch))
    layers = _layers(session)
    assert {name for name, layer in layers.items() if layer["op"] == "conv1d"} == TDNN_NODES
    assert {layers[name]["fused"] for name in TDNN_NODES} == {"bias+relu"}
    # frames after each layer: 40 - 4 = 36, 36 - 4 = 32, 32 - 6 = 26, 26, 26
    assert [layers[f"frame{i}"]["gemm"].split("x")[0] for i in range(1, 6)] == [
        str(batch * f) for f in (36, 32, 26, 26, 26)
    ]


def test_block_sparse_tdnn_matches_ort():
    model = Sparsify(Sparsify.Options(sparsity=0.75, pattern="16x1")).run(tdnn_model(), PassContext()).model
    session = runtimes.load("tvm", model, batch=1, threads=1, sparse="always", cache=False)
    _assert_matches_ort(model, session, _feeds(model, 1))
    layers = _layers(session)
    assert {layers[name]["kernel"] for name in TDNN_NODES} == {"bsr"}


def test_padded_rows_of_the_conv_kernel_match_numpy():
    """26 output frames with a 4-row register tile: the last tile computes 2 rows that are never stored."""
    import tvm

    from runtimes.tvm.kernels.conv import ConvGeometry, dense_conv2d, pack_conv_weight
    from runtimes.tvm.kernels.epilogue import Epilogue
    from runtimes.tvm.kernels.tiles import GemmTile
    from runtimes.tvm.target import host_target

    rng = np.random.default_rng(6)
    frames, channels, out, kernel, dilation = 32, 8, 20, 3, 3
    geometry = ConvGeometry(
        batch=1, padded_h=1, padded_w=frames, channels=channels, out_channels=out, kernel_h=1, kernel_w=kernel,
        stride=(1, 1), dilation=(1, dilation), groups=1,
    )  # fmt: skip
    assert geometry.rows == 26
    tile = GemmTile(mr=4, bn=8, cols_outer=False)
    func = dense_conv2d(geometry, tile, Epilogue(bias=True, relu=True))
    executable = tvm.compile(tvm.IRModule({"main": func}), target=host_target().target)
    x = rng.standard_normal((1, 1, frames, channels)).astype(np.float32)
    w = rng.standard_normal((out, 1, kernel, channels)).astype(np.float32)
    bias = rng.standard_normal(out).astype(np.float32)
    device = tvm.cpu()
    y = tvm.runtime.empty((26, out), "float32", device)
    args = [tvm.runtime.tensor(a, device) for a in (x, pack_conv_weight(w, tile.bn), bias)]
    executable["main"](*args, y)
    taps = [x[0, 0, t * dilation : t * dilation + 26] @ w[:, 0, t].T for t in range(kernel)]
    expected = np.maximum(sum(taps) + bias, 0)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-5)
