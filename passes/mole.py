"""mole: MoLe's Aug-Conv layer (methods.md §5) — the model's first convolution takes morphed data.

The data provider morphs every sample with a secret invertible matrix M (optimizer/morph.py): pad as the first
convolution pads, flatten channel-major, x_m = x @ M. This pass replaces that convolution by

    MatMul(x_m, C_ac) -> Reshape [N, C_out, *out_spatial] (-> Add bias)    with  C_ac = M⁻¹ @ Toeplitz(conv)

so the model computes exactly what it computed before while its input is the morphed vector. The new input is
named `<input>_morphed` ([N, D]); everything after the first convolution is untouched, so the pass is exact and
the pipeline verifies it by morphing its verification inputs with the same key (`map_inputs`).

Give key_out=FILE.npz to write the freshly drawn key (the provider morphs data with it: `optimize morph`), or
key=FILE.npz to build the layer for an existing key. The paper also permutes the Aug-Conv's output channels and
retrains the layers after it, so the developer cannot recover M from C_ac; that needs retraining on morphed data
(PyTorch) and is not done here — without it, C_ac and the original convolution reveal M⁻¹. Costs (reported):
D values sent per sample instead of C·H·W (padding), and a D x (C_out·H_out·W_out) matrix product instead of the
convolution; kappa > 1 (block-diagonal M) makes C_ac block-sparse.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from optimizer import keys
from optimizer.data import graph_inputs
from optimizer.errors import PassError, UsageError
from optimizer.model import metadata_value, set_metadata
from optimizer.morph import (
    MATRIX_KINDS,
    ConvGeometry,
    MorphKey,
    aug_conv_matrix,
    key_bytes,
    load_key,
    make_key,
    morph,
)
from optimizer.report import model_stats
from passes import Artifact, Pass, PassContext, PassResult, option, register
from passes.graph.edit import GraphEdit

METADATA_KEY = keys.MOLE
_DTYPES = {"float32": onnx.TensorProto.FLOAT, "float64": onnx.TensorProto.DOUBLE}


@dataclass(frozen=True)
class FirstConv(ConvGeometry):
    """The convolution that reads the model input directly, with its geometry resolved."""

    node: onnx.NodeProto
    bias: np.ndarray | None


@register
class Mole(Pass):
    name = "mole"
    summary = "MoLe Aug-Conv: the first convolution takes morphed inputs (x @ M); writes or reads the key"
    contract = "exact"

    @dataclass(frozen=True)
    class Options:
        key_out: str | None = option(None, "write the new morphing key here (.npz); the data provider needs it",
                                      file="write")
        key: str | None = option(None, "use this existing key (.npz) instead of drawing a new one", file="read")
        matrix: Literal["orthogonal", "uniform"] = option(
            "orthogonal", "new keys: orthogonal (condition number 1) or the paper's uniform U[0,1) (float64 data)")
        kappa: int = option(1, "new keys: block-diagonal M, kappa copies of one random block (1: dense)")
        dtype: Literal["auto", "float32", "float64"] = option(
            "auto", "morphed input type; auto: float32 for orthogonal, float64 for uniform")
        seed: int | None = option(None, "seed of a new key (default: OS entropy, as a secret should be)")
        input: str | None = option(None, "the model input to morph (default: the only image-like input)")

    def validate(self) -> None:
        o = self.options
        if (o.key is None) == (o.key_out is None):
            raise UsageError("pass mole: give key_out=FILE.npz to save a new morphing key (the data provider needs "
                             "it to morph data), or key=FILE.npz to use an existing one")
        if o.key_out is not None and not Path(o.key_out).resolve().parent.is_dir():
            folder = Path(o.key_out).parent
            raise UsageError(f"pass mole: option key_out={o.key_out}: directory {folder} does not exist")
        if o.matrix not in MATRIX_KINDS:
            raise UsageError(f"pass mole: option matrix={o.matrix!r} is not one of {', '.join(MATRIX_KINDS)}")
        if o.kappa < 1:
            raise UsageError(f"pass mole: option kappa={o.kappa} must be a positive integer")
        if o.dtype not in ("auto", *_DTYPES):
            raise UsageError(f"pass mole: option dtype={o.dtype!r} is not auto, float32 or float64")

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        o = self.options
        input_name = choose_input(model, o.input)
        conv = first_conv(model, input_name)
        dtype = None if o.dtype == "auto" else o.dtype
        if o.key is not None:
            key = load_key(o.key)
            _check_key(key, input_name, conv, o.key, dtype)
        else:
            key = make_key(input_name, conv.sample_shape, conv.pads, kind=o.matrix, kappa=o.kappa, dtype=dtype,
                           seed=o.seed)
        dtype = key.dtype
        aug = aug_conv_matrix(key, conv)
        result = replace_first_conv(model, input_name, conv, aug.astype(dtype), dtype)
        _set_metadata(result, key, conv)
        artifacts = (Artifact(o.key_out, "mole key", key_bytes(key)),) if o.key_out is not None else ()
        return PassResult(result, _details(model, result, key, conv, aug), artifacts)

    def map_inputs(self, result: PassResult, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The morphed form of the input the old model took; other inputs pass through.

        The model's `sculpt.mole` metadata names the input and the key's fingerprint; the key itself is secret and
        never enters the model, so it comes from the result's key artifact (key_out) or the key file (key)."""
        entry = json.loads(metadata_value(result.model, METADATA_KEY) or "{}")
        if entry.get("input") not in feeds:
            return feeds
        key = self._result_key(result, entry["key_sha256"])
        mapped = {k: v for k, v in feeds.items() if k != key.input_name}
        mapped[entry["morphed_input"]] = morph(feeds[key.input_name], key)
        return mapped

    def _result_key(self, result: PassResult, fingerprint: str) -> MorphKey:
        sources = [a.content for a in result.artifacts if a.what == "mole key"]
        if self.options.key is not None:
            sources.append(self.options.key)
        for source in sources:
            key = load_key(source)
            if key.fingerprint() == fingerprint:
                return key
        raise PassError(f"pass mole: no key with fingerprint {fingerprint[:12]}… for the model's {METADATA_KEY}")


def morphed_name(input_name: str) -> str:
    return f"{input_name}_morphed"


def choose_input(model: onnx.ModelProto, wanted: str | None) -> str:
    inputs = graph_inputs(model)
    if wanted is not None:
        if wanted not in {i.name for i in inputs}:
            raise UsageError(f"pass mole: option input={wanted!r} is not a model input "
                             f"(inputs: {', '.join(i.name for i in inputs)})")
        return wanted
    images = [i.name for i in inputs if len(i.type.tensor_type.shape.dim) >= 3]
    if len(images) != 1:
        raise UsageError(f"pass mole: {len(images)} inputs of rank >= 3 ({', '.join(images) or 'none'}); "
                         "name the one to morph with input=NAME")
    return images[0]


def first_conv(model: onnx.ModelProto, input_name: str) -> FirstConv:
    """The Conv that is the only reader of `input_name`, with constant weight and bias and a static sample shape."""
    readers = [n for n in model.graph.node if input_name in n.input]
    if input_name in {o.name for o in model.graph.output}:
        raise PassError(f"pass mole: input {input_name!r} is also a graph output")
    if len(readers) != 1 or readers[0].op_type != "Conv" or readers[0].input[0] != input_name:
        found = ", ".join(f"{n.op_type} {n.name!r}" for n in readers) or "nothing"
        raise PassError(f"pass mole: input {input_name!r} must feed exactly one Conv (as its data input), "
                        f"it feeds {found}; the Aug-Conv folds the morphing into a first linear layer")
    node = readers[0]
    initializers = {t.name: t for t in model.graph.initializer}
    if node.input[1] not in initializers or (len(node.input) > 2 and node.input[2]
                                             and node.input[2] not in initializers):
        raise PassError(f"pass mole: Conv {node.name!r} has a weight or bias that is not an initializer "
                        "(run cleanup first)")
    weight = numpy_helper.to_array(initializers[node.input[1]])
    bias = numpy_helper.to_array(initializers[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
    info = next(i for i in model.graph.input if i.name == input_name)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
    if any(d is None for d in dims[1:]):
        raise PassError(f"pass mole: input {input_name!r} has shape {dims}; the morphing needs a static sample shape")
    sample_shape = tuple(dims[1:])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    spatial = len(sample_shape) - 1
    strides = tuple(attrs.get("strides", [1] * spatial))
    dilations = tuple(attrs.get("dilations", [1] * spatial))
    pads = _resolve_pads(node, attrs, sample_shape[1:], weight.shape[2:], strides, dilations)
    return FirstConv(weight=weight, sample_shape=sample_shape, pads=pads, strides=strides, dilations=dilations,
                     group=int(attrs.get("group", 1)), node=node, bias=bias)


def _resolve_pads(node, attrs, spatial, kernel, strides, dilations) -> tuple[tuple[int, int], ...]:
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        flat = list(attrs.get("pads", [0] * 2 * len(spatial)))
        return tuple((flat[i], flat[i + len(spatial)]) for i in range(len(spatial)))
    if auto_pad == "VALID":
        return tuple((0, 0) for _ in spatial)
    pads = []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        pads.append((small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small))
    return tuple(pads)


def replace_first_conv(model: onnx.ModelProto, input_name: str, conv: FirstConv, aug: np.ndarray,
                       dtype: str) -> onnx.ModelProto:
    """A copy of `model` whose input is the morphed vector and whose first Conv is the Aug-Conv MatMul."""
    edit = GraphEdit(model)
    old_input = edit.tensor(input_name)
    batch = old_input.shape[0] if old_input.shape else None
    new_input = edit.variable(morphed_name(input_name), dtype=np.dtype(dtype), shape=[batch, aug.shape[0]])
    edit.replace_graph_input(old_input, new_input)
    node = edit.tensor(conv.node.output[0]).inputs[0]
    aug_weight = edit.add_initializer(aug, "mole/aug_conv")
    out_shape = edit.add_initializer(
        np.array([-1, aug.shape[1] // int(np.prod(conv.out_spatial)), *conv.out_spatial], np.int64), "mole/out_shape")

    def aug_conv(outputs: list) -> list:
        (output,) = outputs
        flat = edit.variable("mole/aug_conv_out", dtype=np.dtype(dtype))
        nodes = [edit.add_node("MatMul", [new_input, aug_weight], [flat], hint="mole/AugConv")]
        if dtype != "float32":
            cast = edit.variable("mole/aug_conv_out_f32", dtype=np.float32)
            nodes.append(edit.add_node("Cast", [flat], [cast], hint="mole/Cast", attrs={"to": onnx.TensorProto.FLOAT}))
            flat = cast
        shaped = output if conv.bias is None else edit.variable("mole/aug_conv_shaped", dtype=np.float32)
        nodes.append(edit.add_node("Reshape", [flat, out_shape], [shaped], hint="mole/Reshape"))
        if conv.bias is not None:
            bias = edit.add_initializer(conv.bias.astype(np.float32).reshape(1, -1, *[1] * len(conv.out_spatial)),
                                        "mole/bias")
            nodes.append(edit.add_node("Add", [shaped, bias], [output], hint="mole/Bias"))
        return nodes

    edit.replace_subgraph([node], aug_conv)
    return edit.to_model()


def _check_key(key: MorphKey, input_name: str, conv: FirstConv, path: str, dtype: str | None) -> None:
    if dtype is not None and dtype != key.dtype:
        raise UsageError(f"pass mole: option dtype={dtype} but key={path} morphs to {key.dtype}; leave dtype=auto")
    if key.input_name != input_name or key.sample_shape != conv.sample_shape or key.pads != conv.pads:
        raise UsageError(f"pass mole: key={path} morphs input {key.input_name!r} of shape {list(key.sample_shape)} "
                         f"padded {[list(p) for p in key.pads]}; this model's first Conv reads {input_name!r} of "
                         f"shape {list(conv.sample_shape)} padded {[list(p) for p in conv.pads]}")


def _set_metadata(model: onnx.ModelProto, key: MorphKey, conv: FirstConv) -> None:
    entry = {"input": key.input_name, "morphed_input": morphed_name(key.input_name), "conv": conv.node.name,
             "sample_shape": list(key.sample_shape), "pads": [list(p) for p in key.pads], "matrix": key.kind,
             "kappa": key.kappa, "dtype": key.dtype, "key_sha256": key.fingerprint()}
    set_metadata(model, METADATA_KEY, json.dumps(entry))


def _details(before: onnx.ModelProto, after: onnx.ModelProto, key: MorphKey, conv: FirstConv, aug: np.ndarray
             ) -> dict:
    sample_values = int(np.prod(conv.sample_shape))
    outputs = aug.shape[1]
    conv_macs = outputs * int(np.prod(conv.weight.shape[1:]))
    macs_before, macs_after = model_stats(before)["macs"], model_stats(after)["macs"]
    return {
        "input": key.input_name,
        "morphed_input": morphed_name(key.input_name),
        "conv": conv.node.name,
        "matrix": key.kind,
        "kappa": key.kappa,
        "dtype": key.dtype,
        "morphed_length": key.size,
        "sample_values": sample_values,
        "transmission_overhead": round(key.size / sample_values - 1, 6),
        "condition_number": float(np.linalg.cond(key.block)),
        "aug_conv_shape": list(aug.shape),
        "aug_conv_density": round(float(np.count_nonzero(aug)) / aug.size, 6),
        "conv_macs": conv_macs,
        "aug_conv_macs": int(aug.size),
        "model_macs_before": macs_before,
        "model_macs_after": macs_after,
        "compute_overhead": round(macs_after / macs_before - 1, 6) if macs_before else None,
        "key_sha256": key.fingerprint(),
    }
