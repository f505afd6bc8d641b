"""ONNX files as other exporters write them, built in-process: the corpus of `test_wild_corpus.py` and friends.

Styles: onnx.helper at IR 3 / opset 7 (ONNX Model Zoo: initializers listed as graph inputs, weights computed
by ConstantOfShape), onnx.helper at opset 21, Paddle2ONNX (weights in Constant nodes, dims named
"p2o.DynamicDimension.N"), external data, If/Loop subgraphs, fixed and dynamic batch, torch.onnx TorchScript
(CNN, BERT-style encoder with shape subgraphs, Conv+GRU, Conv+LSTM) and torch.onnx dynamo.
Every factory returns a checked ModelProto; `CORPUS` maps readable ids to (style, factory).
"""

from __future__ import annotations

import io

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG_SEED = 0


def _rng(seed: int = RNG_SEED) -> np.random.Generator:
    return np.random.default_rng(seed)


def _w(rng, *shape, scale: float = 0.3) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _checked(model: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(model, full_check=True)
    return model


def _info(name: str, dims, elem=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims)


# --- onnx.helper, IR 3 / opset 7 (ONNX Model Zoo) ---------------------------------------------------------------


def zoo_ir3(constant_of_shape: bool = False, batch: int | str = 1) -> onnx.ModelProto:
    """Conv -> Relu -> MaxPool -> Reshape -> Gemm -> Softmax at IR 3 / opset 7, every initializer also a graph
    input; with `constant_of_shape` the weights are ConstantOfShape(shape) nodes at opset 9 (the onnx package's
    light_* models)."""
    rng = _rng(1)
    weights = {"conv_w": _w(rng, 8, 3, 3, 3), "conv_b": _w(rng, 8), "fc_w": _w(rng, 10, 8 * 4 * 4),
               "fc_b": _w(rng, 10), "shape": np.array([-1, 8 * 4 * 4], np.int64)}
    nodes, initializers = [], []
    for name, value in weights.items():
        if constant_of_shape and value.dtype == np.float32:
            initializers.append(numpy_helper.from_array(np.array(value.shape, np.int64), f"{name}__SHAPE"))
            fill = numpy_helper.from_array(np.array([0.02 + 0.001 * len(nodes)], np.float32))
            nodes.append(helper.make_node("ConstantOfShape", [f"{name}__SHAPE"], [name], value=fill))
        else:
            initializers.append(numpy_helper.from_array(value, name))
    nodes += [
        helper.make_node("Conv", ["data", "conv_w", "conv_b"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu1"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p", "shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["prob"], name="softmax"),
    ]
    inputs = [_info("data", [batch, 3, 8, 8])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in initializers]
    graph = helper.make_graph(nodes, "zoo", inputs, [_info("prob", [batch, 10])], initializers)
    opset = 9 if constant_of_shape else 7
    return _checked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=3))


def zoo_ir3_mlp() -> onnx.ModelProto:
    """Gemm -> Relu -> Gemm at IR 3 / opset 7 with a fixed batch of 1."""
    rng = _rng(2)
    initializers = [numpy_helper.from_array(v, n) for n, v in
                    (("w1", _w(rng, 16, 12)), ("b1", _w(rng, 16)), ("w2", _w(rng, 4, 16)), ("b2", _w(rng, 4)))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1)]
    inputs = [_info("x", [1, 12])] + [_info(t.name, list(t.dims)) for t in initializers]
    graph = helper.make_graph(nodes, "zoo_mlp", inputs, [_info("y", [1, 4])], initializers)
    return _checked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=3))


# --- onnx.helper, opset 21 ----------------------------------------------------------------------------------------


def opset21_cnn(batch: int | str = "N") -> onnx.ModelProto:
    """Conv -> BatchNorm -> Relu -> Conv -> Add(residual) -> GlobalAveragePool -> Flatten -> Gemm, opset 21."""
    rng = _rng(3)
    c = 8
    init = {"w1": _w(rng, c, 3, 3, 3), "w2": _w(rng, c, c, 3, 3), "b2": _w(rng, c),
            "gamma": (1 + _w(rng, c)).astype(np.float32), "beta": _w(rng, c), "mean": _w(rng, c),
            "var": (1 + np.abs(_w(rng, c))).astype(np.float32), "fw": _w(rng, 6, c), "fb": _w(rng, 6)}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn"], name="bn1"),
        helper.make_node("Relu", ["bn"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="residual"),
        helper.make_node("GlobalAveragePool", ["s"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "op21", [_info("x", [batch, 3, 8, 8])], [_info("y", [batch, 6])],
                              [numpy_helper.from_array(v, k) for k, v in init.items()])
    return _checked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))


def opset21_mlp(batch: int | str = "N") -> onnx.ModelProto:
    """MatMul -> Add -> Gelu -> MatMul -> Add, opset 21 (Gelu is an opset-20 op)."""
    rng = _rng(4)
    init = {"w1": _w(rng, 12, 24), "b1": _w(rng, 24), "w2": _w(rng, 24, 5), "b2": _w(rng, 5)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="fc1_bias"),
             helper.make_node("Gelu", ["a1"], ["g"], name="gelu"),
             helper.make_node("MatMul", ["g", "w2"], ["m2"], name="fc2"),
             helper.make_node("Add", ["m2", "b2"], ["y"], name="fc2_bias")]
    graph = helper.make_graph(nodes, "op21_mlp", [_info("x", [batch, 12])], [_info("y", [batch, 5])],
                              [numpy_helper.from_array(v, k) for k, v in init.items()])
    return _checked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))


# --- Paddle2ONNX: weights in Constant nodes, named dynamic dims ------------------------------------------------


def _constant(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(value))


def paddle_cnn() -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> Relu -> Flatten -> MatMul -> Add, every weight a Constant node, input dims named
    p2o.DynamicDimension.0 (batch); opset 11 as Paddle2ONNX writes it by default."""
    rng = _rng(5)
    weights = {"conv1.w_0": _w(rng, 8, 3, 3, 3), "conv1.b_0": _w(rng, 8), "conv2.w_0": _w(rng, 12, 8, 3, 3),
               "conv2.b_0": _w(rng, 12), "fc.w_0": _w(rng, 12 * 6 * 6, 10), "fc.b_0": _w(rng, 10)}
    nodes = [_constant(name, value) for name, value in weights.items()]
    nodes += [
        helper.make_node("Conv", ["x", "conv1.w_0", "conv1.b_0"], ["c1"], name="conv2d_0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu_0"),
        helper.make_node("Conv", ["r1", "conv2.w_0", "conv2.b_0"], ["c2"], name="conv2d_1"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu_1"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten_0"),
        helper.make_node("MatMul", ["f", "fc.w_0"], ["m"], name="matmul_0"),
        helper.make_node("Add", ["m", "fc.b_0"], ["y"], name="elementwise_add_0"),
    ]
    graph = helper.make_graph(nodes, "paddle", [_info("x", ["p2o.DynamicDimension.0", 3, 8, 8])],
                              [_info("y", ["p2o.DynamicDimension.0", 10])])
    return _checked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6))


def paddle_weight_elements() -> int:
    """The number of weight elements paddle_cnn holds (the reference for its params)."""
    return 8 * 3 * 3 * 3 + 8 + 12 * 8 * 3 * 3 + 12 + 12 * 6 * 6 * 10 + 10


def paddle_sequence() -> onnx.ModelProto:
    """Paddle-style MatMul stack over [batch, p2o.DynamicDimension.1 (sequence), 16], Constant-node weights."""
    rng = _rng(6)
    nodes = [_constant("w0", _w(rng, 16, 32)), _constant("b0", _w(rng, 32)), _constant("w1", _w(rng, 32, 8))]
    nodes += [helper.make_node("MatMul", ["x", "w0"], ["m0"], name="matmul_0"),
              helper.make_node("Add", ["m0", "b0"], ["a0"], name="add_0"),
              helper.make_node("Relu", ["a0"], ["r0"], name="relu_0"),
              helper.make_node("MatMul", ["r0", "w1"], ["y"], name="matmul_1")]
    dims = ["p2o.DynamicDimension.0", "p2o.DynamicDimension.1"]
    graph = helper.make_graph(nodes, "paddle_seq", [_info("x", [*dims, 16])], [_info("y", [*dims, 8])])
    return _checked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7))


# --- subgraphs ----------------------------------------------------------------------------------------------------


def if_model() -> onnx.ModelProto:
    """A VAD-style graph (silero): Conv front end, then an If on a scalar sample-rate input whose branches run
    different convolutions on an outer-scope tensor."""
    rng = _rng(7)

    def branch(name: str, weight: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Conv", ["r1", weight], [f"{name}_y"], name=f"{name}_conv"),
             helper.make_node("Relu", [f"{name}_y"], [f"{name}_out"], name=f"{name}_relu")],
            name, [], [_info(f"{name}_out", None)])

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Equal", ["sr", "k16"], ["cond"], name="is_16k"),
             helper.make_node("If", ["cond"], ["branch_out"], name="by_rate",
                              then_branch=branch("then", "wa"), else_branch=branch("else", "wb")),
             helper.make_node("Conv", ["branch_out", "w2"], ["c2"], name="conv2"),
             helper.make_node("ReduceMean", ["c2", "axes"], ["y"], name="mean", keepdims=0)]
    init = [numpy_helper.from_array(v, k) for k, v in (
        ("w1", _w(rng, 16, 4, 3)), ("b1", _w(rng, 16)), ("k16", np.array(16000, np.int64)),
        ("wa", _w(rng, 8, 16, 1)), ("wb", _w(rng, 8, 16, 1)), ("w2", _w(rng, 2, 8, 1)),
        ("axes", np.array([2], np.int64)))]
    graph = helper.make_graph(nodes, "vad", [_info("x", ["batch", 4, 32]), _info("sr", [], TensorProto.INT64)],
                              [_info("y", ["batch", 2])], init)
    return _checked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8))


def loop_model() -> onnx.ModelProto:
    """Gemm, then a Loop that applies the same residual Gemm three times (a weight-shared recurrence)."""
    rng = _rng(8)
    body = helper.make_graph(
        [helper.make_node("Gemm", ["h_in", "wl"], ["hm"], name="loop_gemm"),
         helper.make_node("Tanh", ["hm"], ["ht"], name="loop_tanh"),
         helper.make_node("Add", ["h_in", "ht"], ["h_out"], name="loop_add"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond")],
        "body", [_info("i", [], TensorProto.INT64), _info("cond_in", [], TensorProto.BOOL), _info("h_in", None)],
        [_info("cond_out", [], TensorProto.BOOL), _info("h_out", None)])
    nodes = [helper.make_node("Gemm", ["x", "w0", "b0"], ["h0"], name="fc_in"),
             helper.make_node("Loop", ["trips", "", "h0"], ["h"], name="refine", body=body),
             helper.make_node("Gemm", ["h", "w1"], ["y"], name="fc_out")]
    init = [numpy_helper.from_array(v, k) for k, v in (
        ("w0", _w(rng, 6, 8)), ("b0", _w(rng, 8)), ("wl", _w(rng, 8, 8)), ("w1", _w(rng, 8, 3)),
        ("trips", np.array(3, np.int64)))]
    graph = helper.make_graph(nodes, "loop", [_info("x", ["N", 6])], [_info("y", ["N", 3])], init)
    return _checked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def helper_rnn(op: str = "RNN", directions: int = 1) -> onnx.ModelProto:
    """MatMul(input projection) -> RNN/GRU/LSTM (seq-first) -> Squeeze -> MatMul, written with onnx.helper."""
    rng = _rng(9)
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[op]
    hidden, inputs = 6, 10
    init = {"wp": _w(rng, 5, inputs), "W": _w(rng, directions, gates * hidden, inputs),
            "R": _w(rng, directions, gates * hidden, hidden), "B": _w(rng, directions, 2 * gates * hidden),
            "wo": _w(rng, directions * hidden, 4), "perm_shape": np.array([0, 0, -1], np.int64)}
    direction = "bidirectional" if directions == 2 else "forward"
    nodes = [helper.make_node("MatMul", ["x", "wp"], ["p"], name="project"),
             helper.make_node(op, ["p", "W", "R", "B"], ["seq", "last"], name=op.lower(), hidden_size=hidden,
                              direction=direction),
             helper.make_node("Transpose", ["seq"], ["seq_t"], name="to_tbdh", perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["seq_t", "perm_shape"], ["flat"], name="merge_directions"),
             helper.make_node("MatMul", ["flat", "wo"], ["y"], name="classify")]
    graph = helper.make_graph(nodes, f"helper_{op.lower()}", [_info("x", [7, "batch", 5])],
                              [_info("y", [7, "batch", 4])], [numpy_helper.from_array(v, k) for k, v in init.items()])
    return _checked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


# --- torch.onnx ---------------------------------------------------------------------------------------------------


def _torch_export(module, args, *, dynamo: bool = False, dynamic: dict | None = None, names=("x",),
                  outputs=("y",), opset: int = 17) -> onnx.ModelProto:
    import torch

    module = module.eval()
    buffer = io.BytesIO()
    with torch.no_grad():
        if dynamo:
            program = torch.onnx.export(module, args, dynamo=True, input_names=list(names),
                                        output_names=list(outputs), dynamic_shapes=dynamic, opset_version=opset,
                                        verbose=False)
            return _checked(program.model_proto)
        torch.onnx.export(module, args, buffer, dynamo=False, input_names=list(names), output_names=list(outputs),
                          dynamic_axes=dynamic, opset_version=opset)
    return _checked(onnx.load_from_string(buffer.getvalue()))


def torch_modules():
    """The torch modules behind the torch exports (imported lazily: torch is heavy)."""
    import torch
    from torch import nn

    class Cnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c2 = nn.Conv2d(8, 12, 3, padding=1)
            self.fc = nn.Linear(12, 5)

        def forward(self, x):
            h = torch.relu(self.c2(torch.relu(self.b1(self.c1(x)))))
            return self.fc(h.mean(dim=(2, 3)))

    class Attention(nn.Module):
        def __init__(self, d: int = 16, heads: int = 2):
            super().__init__()
            self.heads, self.qkv, self.out = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(x).split(d, dim=-1)
            q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
            a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
            return self.out((a @ v).transpose(1, 2).reshape(b, t, d))

    class Encoder(nn.Module):
        """A Hugging Face-style BERT: token + position embeddings, post-norm attention and GELU FFN blocks."""

        def __init__(self, vocab: int = 50, d: int = 16, layers: int = 2):
            super().__init__()
            self.tokens, self.positions = nn.Embedding(vocab, d), nn.Embedding(32, d)
            self.attn = nn.ModuleList(Attention(d) for _ in range(layers))
            self.n1 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
            self.ffn = nn.ModuleList(nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d))
                                     for _ in range(layers))
            self.n2 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))

        def forward(self, ids):
            positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
            h = self.tokens(ids) + self.positions(positions)
            for attn, n1, ffn, n2 in zip(self.attn, self.n1, self.ffn, self.n2, strict=True):
                h = n1(h + attn(h))
                h = n2(h + ffn(h))
            return h

    class ConvRnn(nn.Module):
        """An OCR/VAD-style front end: Conv1d -> Conv1d -> LSTM or GRU (batch first) -> Linear."""

        def __init__(self, kind: str = "lstm", channels: int = 24, hidden: int = 32):
            super().__init__()
            self.c1, self.c2 = nn.Conv1d(8, 16, 3, padding=1), nn.Conv1d(16, channels, 3, padding=1)
            self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(channels, hidden, batch_first=True)
            self.fc = nn.Linear(hidden, 10)

        def forward(self, x):
            h = torch.relu(self.c2(torch.relu(self.c1(x))))
            y, _ = self.rnn(h.transpose(1, 2))
            return self.fc(y)

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.f1, self.f2 = nn.Linear(12, 24), nn.Linear(24, 4)

        def forward(self, x):
            return self.f2(torch.relu(self.f1(x)))

    return {"cnn": Cnn, "encoder": Encoder, "conv_rnn": ConvRnn, "mlp": Mlp}


def torch_cnn() -> onnx.ModelProto:
    import torch

    torch.manual_seed(0)
    return _torch_export(torch_modules()["cnn"](), (torch.randn(1, 3, 8, 8),), dynamic={"x": {0: "batch"}})


def torch_encoder() -> onnx.ModelProto:
    """The BERT-style encoder exported as Hugging Face does: dynamic batch and sequence, shape subgraphs."""
    import torch

    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 12))
    return _torch_export(torch_modules()["encoder"](), (ids,), names=("input_ids",), outputs=("hidden",),
                         dynamic={"input_ids": {0: "batch", 1: "sequence"}, "hidden": {0: "batch", 1: "sequence"}})


def torch_conv_rnn(kind: str = "lstm", channels: int = 24, hidden: int = 32) -> onnx.ModelProto:
    import torch

    torch.manual_seed(0)
    module = torch_modules()["conv_rnn"](kind, channels, hidden)
    return _torch_export(module, (torch.randn(1, 8, 12),), dynamic={"x": {0: "batch"}})


def torch_fixed_batch_mlp() -> onnx.ModelProto:
    import torch

    torch.manual_seed(0)
    return _torch_export(torch_modules()["mlp"](), (torch.randn(1, 12),))


def dynamo_mlp() -> onnx.ModelProto:
    import torch

    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=1024)
    return _torch_export(torch_modules()["mlp"](), (torch.randn(2, 12),), dynamo=True,
                         dynamic={"x": {0: batch}}, opset=18)


CORPUS = {
    "zoo-ir3-conv": ("onnx.helper IR3/opset7", zoo_ir3),
    "zoo-ir3-constantofshape": ("onnx.helper IR3/opset7", lambda: zoo_ir3(constant_of_shape=True)),
    "zoo-ir3-dynamic-batch": ("onnx.helper IR3/opset7", lambda: zoo_ir3(batch="N")),
    "zoo-ir3-mlp-fixed-batch": ("onnx.helper IR3/opset7", zoo_ir3_mlp),
    "opset21-cnn": ("onnx.helper opset21", opset21_cnn),
    "opset21-cnn-fixed-batch": ("onnx.helper opset21", lambda: opset21_cnn(batch=1)),
    "opset21-mlp": ("onnx.helper opset21", opset21_mlp),
    "paddle-cnn": ("paddle constant nodes", paddle_cnn),
    "paddle-sequence": ("paddle constant nodes", paddle_sequence),
    "external-cnn": ("external data", opset21_cnn),
    "external-mlp": ("external data", opset21_mlp),
    "if-vad": ("subgraphs", if_model),
    "loop": ("subgraphs", loop_model),
    "helper-rnn": ("onnx.helper recurrent", helper_rnn),
    "helper-gru": ("onnx.helper recurrent", lambda: helper_rnn("GRU")),
    "helper-bilstm": ("onnx.helper recurrent", lambda: helper_rnn("LSTM", 2)),
    "torchscript-cnn": ("torch.onnx TorchScript", torch_cnn),
    "torchscript-encoder": ("torch.onnx TorchScript", torch_encoder),
    "torchscript-conv-lstm": ("torch.onnx TorchScript", torch_conv_rnn),
    "torchscript-conv-gru": ("torch.onnx TorchScript", lambda: torch_conv_rnn("gru")),
    "torchscript-fixed-batch": ("torch.onnx TorchScript", torch_fixed_batch_mlp),
    "dynamo-mlp": ("torch.onnx dynamo", dynamo_mlp),
}
EXTERNAL = {"external-cnn", "external-mlp"}


def sample_data(model: onnx.ModelProto, samples: int = 8, sequence: int = 12, seed: int = 0) -> dict:
    """Calibration-like feeds: `samples` on open batch axes (the fixed batch otherwise), `sequence` on other
    open dims, token ids below 50, sample-rate scalars 16000."""
    from optimizer.data import graph_inputs

    rng = _rng(seed)
    feeds = {}
    for value in graph_inputs(model):
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (samples if axis == 0 else sequence)
                for axis, d in enumerate(tensor.shape.dim)]
        if len(dims) >= 2 and dims[0] == 1:
            dims[0] = samples  # a fixed batch of 1 is fed in chunks
        if tensor.elem_type == TensorProto.INT64 and not dims:
            feeds[value.name] = np.array(16000, np.int64)
        elif tensor.elem_type == TensorProto.INT64:
            feeds[value.name] = rng.integers(0, 50, size=dims).astype(np.int64)
        else:
            feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds
