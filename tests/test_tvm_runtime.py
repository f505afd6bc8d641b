"""The tvm runtime against ONNX Runtime: dense and block-sparse MLP, convolutions (stride, padding, dilation,
groups, residual), a transformer block; batch 1 and 8; dynamic batch, disk cache, options and errors."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import runtimes
from optimizer.data import random_inputs
from optimizer.errors import MissingDependency, RuntimeFailure, UsageError
from passes import PassContext
from passes.sparsify import Sparsify

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tvm") is None, reason="apache-tvm is not installed")

RELATIVE_TOLERANCE = 1e-4


def _checked(model: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(model, full_check=True)
    return model


def _weight(rng, name, *shape, scale=0.3):
    return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name)


def mlp_model() -> onnx.ModelProto:
    """x[N, 32] -> Gemm(transB=1) 64 -> Relu -> MatMul 48 -> + b -> Relu -> Gemm(transB=0) 10."""
    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
            helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
            helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="fc2"),
            helper.make_node("Add", ["m2", "b2"], ["h2"], name="bias2"),
            helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
            helper.make_node("Gemm", ["r2", "w3", "b3"], ["y"], name="fc3"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [
            _weight(rng, "w1", 64, 32),
            _weight(rng, "b1", 64),
            _weight(rng, "w2", 64, 48),
            _weight(rng, "b2", 48),
            _weight(rng, "w3", 48, 10),
            _weight(rng, "b3", 10),
        ],  # fmt: skip
    )
    return _checked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def conv_model() -> onnx.ModelProto:
    """Convs with stride, padding (asymmetric too), dilation, groups, depthwise, an unfolded BatchNormalization and a
    residual add, then a Gemm."""
    rng = np.random.default_rng(2)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "k1", "c1"], ["a1"], name="strided", strides=[2, 2], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["a1", "gamma", "beta", "mean", "var"], ["n1"], name="bn1"),
            helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
            helper.make_node(
                "Conv", ["r1", "k2"], ["a2"], name="dilated_grouped", dilations=[2, 2], pads=[2, 2, 2, 2], group=2
            ),  # fmt: skip
            helper.make_node("Conv", ["a2", "k3", "c3"], ["a3"], name="depthwise", pads=[1, 1, 1, 1], group=16),
            helper.make_node("Conv", ["a3", "k4", "c4"], ["a4"], name="asymmetric", pads=[1, 0, 1, 1]),
            helper.make_node("Add", ["a4", "a3"], ["s4"], name="residual"),
            helper.make_node("Relu", ["s4"], ["r4"], name="relu4"),
            helper.make_node("MaxPool", ["r4"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "w5", "c5"], ["y"], name="fc", transB=1),
        ],
        "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [
            _weight(rng, "k1", 16, 4, 3, 3),
            _weight(rng, "c1", 16),
            _weight(rng, "k2", 16, 8, 3, 3),
            _weight(rng, "k3", 16, 1, 3, 3),
            _weight(rng, "c3", 16),
            _weight(rng, "k4", 16, 16, 3, 2),
            _weight(rng, "c4", 16),
            _weight(rng, "w5", 10, 64),
            _weight(rng, "c5", 10),
            _weight(rng, "gamma", 16),
            _weight(rng, "beta", 16),
            _weight(rng, "mean", 16),
            numpy_helper.from_array(rng.uniform(0.5, 1.5, 16).astype(np.float32), "var"),
        ],  # fmt: skip
    )
    return _checked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def transformer_model() -> onnx.ModelProto:
    """A tiny encoder block: 3-D MatMuls, attention (two activation matmuls), Softmax, LayerNorm, GELU via Erf."""
    rng = np.random.default_rng(3)
    d, heads, seq, ffn = 16, 2, 4, 32
    nodes = [helper.make_node("Constant", [], ["split_shape"], value=numpy_helper.from_array(
        np.array([-1, seq, heads, d // heads], np.int64)))]  # fmt: skip
    for name in "qkv":
        nodes += [
            helper.make_node("MatMul", ["x", f"w{name}"], [f"{name}0"], name=f"{name}_proj"),
            helper.make_node("Add", [f"{name}0", f"b{name}"], [f"{name}1"]),
            helper.make_node("Reshape", [f"{name}1", "split_shape"], [f"{name}2"]),
            helper.make_node(
                "Transpose", [f"{name}2"], [f"{name}h"], perm=[0, 2, 3, 1] if name == "k" else [0, 2, 1, 3]
            ),
        ]
    nodes += [
        helper.make_node("MatMul", ["qh", "kh"], ["scores"], name="scores"),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["attention"], axis=-1),
        helper.make_node("MatMul", ["attention", "vh"], ["mixed"], name="mix"),
        helper.make_node("Transpose", ["mixed"], ["mixed_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["mixed_t", "merge_shape"], ["merged"]),
        helper.make_node("MatMul", ["merged", "wo"], ["o0"], name="out_proj"),
        helper.make_node("Add", ["o0", "bo"], ["o1"]),
        helper.make_node("Add", ["o1", "x"], ["res1"]),
        helper.make_node("LayerNormalization", ["res1", "gamma", "beta"], ["norm"], axis=-1),
        helper.make_node("MatMul", ["norm", "w1"], ["f0"], name="ffn1"),
        helper.make_node("Add", ["f0", "b1"], ["f1"]),
        helper.make_node("Div", ["f1", "sqrt2"], ["g0"]),
        helper.make_node("Erf", ["g0"], ["g1"]),
        helper.make_node("Add", ["g1", "one"], ["g2"]),
        helper.make_node("Mul", ["f1", "g2"], ["g3"]),
        helper.make_node("Mul", ["g3", "half"], ["gelu"]),
        helper.make_node("MatMul", ["gelu", "w2"], ["f2"], name="ffn2"),
        helper.make_node("Add", ["f2", "b2"], ["f3"]),
        helper.make_node("Add", ["f3", "norm"], ["y"]),
    ]
    scalars = {"scale": 0.5, "sqrt2": 2**0.5, "one": 1.0, "half": 0.5}
    graph = helper.make_graph(
        nodes,
        "encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", seq, d])],
        [_weight(rng, f"w{n}", d, d) for n in "qkvo"]
        + [_weight(rng, f"b{n}", d) for n in "qkvo"]
        + [_weight(rng, "w1", d, ffn), _weight(rng, "b1", ffn), _weight(rng, "w2", ffn, d), _weight(rng, "b2", d)]
        + [_weight(rng, "gamma", d, scale=1.0), _weight(rng, "beta", d)]
        + [numpy_helper.from_array(np.array([-1, seq, d], np.int64), "merge_shape")]
        + [numpy_helper.from_array(np.float32(v), k) for k, v in scalars.items()],
    )
    return _checked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def sparsified(model: onnx.ModelProto, pattern: str, sparsity: float, exclude: str | None = None) -> onnx.ModelProto:
    options = Sparsify.Options(sparsity=sparsity, pattern=pattern, exclude=exclude)
    return Sparsify(options).run(model, PassContext()).model


def _feeds(model: onnx.ModelProto, batch: int) -> dict[str, np.ndarray]:
    return random_inputs(model, batch, seed=batch)


def _assert_matches_ort(model, session, feeds):
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    actual = session.run(feeds)
    assert list(actual) == [o.name for o in model.graph.output]
    for want, got in zip(expected, actual.values(), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert np.abs(got - want).max() <= RELATIVE_TOLERANCE * np.abs(want).max()


@pytest.mark.parametrize("batch", [1, 8])
def test_mlp_with_dense_and_block_sparse_layers_matches_ort(batch):
    model = sparsified(mlp_model(), "16x1", 0.9, exclude="fc2")
    session = runtimes.load("tvm", model, batch=batch, threads=1, cache=False)
    _assert_matches_ort(model, session, _feeds(model, batch))
    layers = {layer["name"]: layer for layer in session.describe()["layers"]}
    assert [layers[name]["kernel"] for name in ("fc1", "fc2", "fc3")] == ["bsr", "dense", "bsr"]
    assert layers["fc1"]["block"] == "16x1" and layers["fc1"]["block_sparsity"] == pytest.approx(0.9, abs=0.01)
    assert [layers[name]["fused"] for name in ("fc1", "fc2", "fc3")] == ["bias+relu", "bias+relu", "bias"]


@pytest.mark.parametrize("batch", [1, 8])
def test_convolutions_match_ort(batch):
    model = conv_model()
    session = runtimes.load("tvm", model, batch=batch, threads=1, cache=False)
    _assert_matches_ort(model, session, _feeds(model, batch))
    layers = {layer["name"]: layer for layer in session.describe()["layers"]}
    assert set(layers) == {"strided", "dilated_grouped", "depthwise", "asymmetric", "fc"}
    assert layers["strided"]["fused"] == "bias+relu"  # the BatchNormalization went into weights and bias
    assert layers["asymmetric"]["fused"] == "bias+residual+relu"


def test_block_sparse_convolutions_match_ort():
    model, batch = sparsified(conv_model(), "8x8", 0.5), 8
    session = runtimes.load("tvm", model, batch=batch, threads=1, sparse="always", block="8x8", cache=False)
    _assert_matches_ort(model, session, _feeds(model, batch))
    layers = {layer["name"]: layer for layer in session.describe()["layers"]}
    assert {name for name, layer in layers.items() if layer["kernel"] == "bsr"} == {"strided", "asymmetric", "fc"}
    assert "groups" in layers["depthwise"]["reason"]


@pytest.mark.parametrize("batch", [1, 8])
def test_transformer_block_matches_ort(batch):
    model = transformer_model()
    session = runtimes.load("tvm", model, batch=batch, threads=1, cache=False)
    _assert_matches_ort(model, session, _feeds(model, batch))
    layers = session.describe()["layers"]
    assert [layer["op"] for layer in layers].count("batch_matmul") == 2
    assert {layer["name"] for layer in layers} >= {"q_proj", "k_proj", "v_proj", "out_proj", "ffn1", "ffn2"}


def test_dynamic_batch_compiles_per_batch_and_the_disk_cache_is_reused(tmp_path):
    model, cache_dir = mlp_model(), str(tmp_path)
    session = runtimes.load("tvm", model, threads=1, cache_dir=cache_dir)
    assert session.describe()["compiled"] is False
    for batch in (1, 3):
        _assert_matches_ort(model, session, _feeds(model, batch))
        assert session.describe()["input_shapes"] == {"x": [batch, 32]}
        assert session.describe()["cache_hit"] is False
    again = runtimes.load("tvm", model, batch=3, threads=1, cache_dir=cache_dir)
    assert again.describe()["cache_hit"] is True
    _assert_matches_ort(model, again, _feeds(model, 3))


def test_options_arrive_as_strings_and_describe_reports_them():
    session = runtimes.load("tvm", mlp_model(), threads="1", sparse="never", block="8x8", cache="false")
    facts = session.describe()
    assert (facts["threads"], facts["sparse"], facts["block"], facts["compiled"]) == (1, "never", "8x8", False)
    assert facts["target"].startswith("llvm -mtriple=x86_64-linux-gnu -mcpu=")


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"sparsity": 0.5}, "unknown option 'sparsity'; options are: threads, batch, sparse"),
        ({"sparse": "sometimes"}, "sparse='sometimes'"),
        ({"block": "16by1"}, "block='16by1'"),
        ({"threads": 0}, "threads=0"),
        ({"batch": "eight"}, "batch='eight'"),
    ],
)
def test_bad_options_are_usage_errors(options, fragment):
    with pytest.raises(UsageError, match=fragment):
        runtimes.load("tvm", mlp_model(), **options)


def test_an_op_tvm_cannot_import_runs_on_onnxruntime_and_is_named():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Celu", ["r"], ["y"], name="my_celu")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = _checked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    session = runtimes.load("tvm", model, cache=False, threads=1)
    x = np.linspace(-2, 2, 4, dtype=np.float32).reshape(1, 4)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(session.run({"x": x})["y"], want, rtol=1e-6, atol=1e-7)
    facts = session.describe()
    assert facts["onnxruntime_ops"] == ["Celu"] and [r["runtime"] for r in facts["runs"]] == ["tvm", "ort"]


def test_an_op_neither_tvm_nor_onnxruntime_runs_is_named_with_its_node():
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], name="my_frob", domain="com.example")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    session = runtimes.load("tvm", model, cache=False, threads=1)
    with pytest.raises(RuntimeFailure, match="op 'com.example.Frobnicate' \\(node 'my_frob'\\)"):
        session.run({"x": np.ones((1, 4), np.float32)})


def test_missing_tvm_gives_an_install_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tvm" else real(name, *a))
    with pytest.raises(MissingDependency, match=r"apache-tvm.*pip install 'sculpt\[tvm\]'"):
        runtimes.load("tvm", mlp_model())


def test_importing_the_runtime_package_does_not_import_tvm():
    code = "import sys, runtimes, runtimes.tvm; assert 'tvm' not in sys.modules, 'tvm was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_tuning_needs_fixed_shapes_and_a_positive_trial_count():
    from runtimes.tvm.options import parse_options
    from runtimes.tvm.tune import tune

    with pytest.raises(UsageError, match="--batch"):
        tune(mlp_model(), trials=4, options=parse_options({}))
    with pytest.raises(UsageError, match="--trials 0"):
        tune(mlp_model(), trials=0, options=parse_options({"batch": 2}))
