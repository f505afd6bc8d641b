"""Export a trained torch model to ONNX (opset 17) with the `sculpt.` metadata that the passes read.

metadata_props written:
  sculpt.regularizer    JSON list of the regularizer terms used in training (kind, weight, groups, layers)
  sculpt.groups         JSON {layer: {"weight": initializer, "shape", "filter_axis", "channel_axis",
                        "attached": [bias / BatchNorm γ, β initializers], "batchnorm"}}: the channel group structure
  sculpt.quant          JSON in the quantize pass's schema (passes/quantize.py) for QAT models: per int8 weight
                        initializer its layer, bits, axis and fractional lengths (weight, input, bias)
  sculpt.<key>          anything passed in `metadata` (strings as they are, other values as JSON)

Initializer names are the torch parameter names (BatchNorm is exported as a node, not folded, so its γ/β keep
their names); a QAT weight becomes the int8 initializer "<param>_quantized" read by a DequantizeLinear. A QAT model
in the bit-slice L1 authors' format (prepare_qat(magnitude_bits=8)) gets int16 codes in ±255 instead (sign plus
8-bit magnitude; why int16: passes/quantize.py) and opset 21, the first with int16 DequantizeLinear.
"""

from __future__ import annotations

import io
import json
import os
import sys
import types
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from optimizer import keys, quant
from optimizer.errors import ModelError, UsageError
from optimizer.model import save_model, set_metadata
from optimizer.quant import QUANT_METADATA_KEY
from optimizer.training.quantization import export_mode
from optimizer.training.regularizers import SparsityRegularizer

OPSET = 17
INT16_OPSET = 21  # DequantizeLinear takes int16 from opset 21


def export(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    regularizer: SparsityRegularizer | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
) -> onnx.ModelProto:
    """Write `model` (eval mode) as ONNX to `path` atomically and return the ModelProto.

    example_inputs: one tensor or a sequence (one per forward argument). Names default to "input" / "output"
    (numbered when there are several). dynamic_batch makes axis 0 of every input and output symbolic ("batch").
    """
    if not isinstance(example_inputs, (torch.Tensor, list, tuple)):
        raise UsageError(f"export: example_inputs must be a tensor or a sequence of tensors, not "
                         f"{type(example_inputs).__name__}")
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    input_names = list(input_names or _default_names("input", len(args)))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            sample_outputs = module(*args)
        count = 1 if isinstance(sample_outputs, torch.Tensor) else len(sample_outputs)
        output_names = list(output_names or _default_names("output", count))
        axes = {name: {0: "batch"} for name in [*input_names, *output_names]} if dynamic_batch else None
        buffer = io.BytesIO()
        with export_mode(module) as quantization, warnings.catch_warnings():
            # the TorchScript exporter (the one that writes opset 17 directly) warns that it is deprecated
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, buffer, dynamo=False, opset_version=OPSET, input_names=input_names,
                output_names=output_names, dynamic_axes=axes, do_constant_folding=False,
            )
    finally:
        module.train(was_training)
    proto = _fold_exported(onnx.load_from_string(buffer.getvalue()), quantization)
    proto = _dequantize_magnitude_weights(proto, quantization)
    _write_metadata(proto, _sculpt_metadata(proto, regularizer, quantization, metadata))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ModelError(f"{path}: the exported model fails the ONNX checker: {str(e).splitlines()[0]}") from e
    save_model(proto, path)
    return proto


def _default_names(stem: str, count: int) -> list[str]:
    return [stem] if count == 1 else [f"{stem}_{i}" for i in range(count)]


def _sculpt_metadata(
    proto: onnx.ModelProto, regularizer: SparsityRegularizer | None, quantization: dict, extra: Mapping | None
) -> dict[str, str]:
    out = {}
    initializers = {t.name for t in proto.graph.initializer}
    if regularizer is not None:
        description = regularizer.describe()
        out[keys.REGULARIZER] = json.dumps(description["terms"])
        out[keys.GROUPS] = json.dumps(_onnx_names(description["layers"], initializers))
    if quantization:
        out[QUANT_METADATA_KEY] = json.dumps(_quant_metadata(quantization, initializers))
    for key, value in (extra or {}).items():
        name = key if key.startswith("sculpt.") else f"sculpt.{key}"
        out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def _quant_metadata(quantization: dict, initializers: set[str]) -> dict:
    """The quantize pass's `sculpt.quant` schema (passes/quantize.py), so bit-slice and the reram runtime read a
    QAT export exactly as they read a post-training quantized model; per layer it adds the training-time facts."""
    weights = {}
    for layer, info in quantization.items():
        name = f"{layer}.weight_quantized"
        if name in initializers:
            weights[name] = {
                "layer": layer,
                "float_weight": f"{layer}.weight",
                "bits": info["weight_bits"],
                "axis": 0 if info["weight_granularity"] == "channel" else None,
                "frac_length": info["weight_frac_length"],
                **{k: v for k, v in info.items() if k.startswith(("input_", "bias_"))},
                **({"format": "sign-magnitude", "magnitude_bits": info["magnitude_bits"],
                    "saturated": info["weight_saturated"]} if "magnitude_bits" in info else {}),
                "granularity": info["weight_granularity"],
            }
    return {"version": 1, "scale": "dfp", "source": "qat", "weights": weights}


def _onnx_names(layers: dict, initializers: set[str]) -> dict:
    """Point the group structure at initializers that exist (a QAT weight is stored as '<name>_quantized')."""
    mapped = {}
    for name, layer in layers.items():
        weight = layer["weight"]
        if weight not in initializers and f"{weight}_quantized" in initializers:
            weight = f"{weight}_quantized"
        if weight not in initializers:
            raise ModelError(f"layer {name}: its weight {layer['weight']} is not an initializer of the exported model")
        attached = [a if a in initializers else f"{a}_quantized" for a in layer["attached"]]
        mapped[name] = {**layer, "weight": weight, "attached": [a for a in attached if a in initializers]}
    return mapped


def _write_metadata(proto: onnx.ModelProto, values: dict[str, str]) -> None:
    for key, value in values.items():
        set_metadata(proto, key, value)


def _fold_exported(proto: onnx.ModelProto, quantization: dict) -> onnx.ModelProto:
    """Constants to initializers, weight quantizers to integer initializers, QAT biases to int32 codes; one
    graph-edit session (passes.graph.edit), swept and sorted at the end."""
    from passes.graph.edit import GraphEdit

    edit = GraphEdit(proto)
    _fold_constants(edit)
    _fold_weight_quantizers(edit)
    _quantize_biases(edit, quantization)
    return edit.to_model()


def _constant(tensor) -> np.ndarray | None:
    import onnx_graphsurgeon as gs

    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def _fold_constants(edit) -> None:
    """Constant nodes and Cast(constant) -> initializers. The exporter writes every quantizer scale, zero point
    and clip bound that way; as initializers the QDQ pattern is the standard one that other tools read."""
    for node in [n for n in edit.graph.nodes if n.op == "Constant"]:
        value = _constant(node.attrs.get("value"))
        if value is not None:
            edit.constant_node_to_initializer(node, value)
    for node in [n for n in edit.graph.nodes if n.op == "Cast" and _constant(n.inputs[0]) is not None]:
        value = _constant(node.inputs[0]).astype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]))
        edit.constant_node_to_initializer(node, value)


def _fold_weight_quantizers(edit) -> None:
    """QuantizeLinear(float weight initializer) -> an int8 initializer holding the codes (optimizer.quant math).

    What is left is the standard QDQ weight form, int8 initializer -> DequantizeLinear, which the `bit-slice`
    pass and the ReRAM runtime read directly.
    """
    for node in [n for n in edit.graph.nodes if n.op == "QuantizeLinear" and _constant(n.inputs[0]) is not None]:
        weight = _constant(node.inputs[0])
        scale, zero_point = _constant(node.inputs[1]), _constant(node.inputs[2])
        if scale is None or zero_point is None or np.any(zero_point != 0) or zero_point.dtype != np.int8:
            raise ModelError(f"QuantizeLinear {node.name}: expected a constant scale and a zero int8 zero point")
        fl = -np.log2(scale.astype(np.float64))
        if not np.allclose(fl, np.round(fl)):
            raise ModelError(f"QuantizeLinear {node.name}: scale {scale} is not a power of two (not DFP)")
        axis = node.attrs.get("axis", 1)
        fl = np.round(fl).astype(np.int64)
        if fl.ndim == 1:
            fl = fl.reshape([-1 if i == axis % weight.ndim else 1 for i in range(weight.ndim)])
        codes = quant.quantize_dfp(weight, 8, fl).astype(np.int8)
        edit.remove_node(node, edit.add_initializer(codes, f"{node.inputs[0].name}_quantized"))


def _quantize_biases(edit, quantization: dict) -> None:
    """A QAT layer's bias (already on its grid, see quantization.export_mode) -> int32 codes -> DequantizeLinear
    with scale 2^-(fl_in + fl_w), the bias form the `quantize` pass writes."""
    tensors = edit.graph.tensors()
    for layer, info in quantization.items():
        name = f"{layer}.bias"
        bias = _constant(tensors.get(name))
        if info["bias_frac_length"] is None or bias is None:
            continue
        fl = np.asarray(info["bias_frac_length"], dtype=np.int64)
        codes = np.rint(bias.astype(np.float64) * np.exp2(fl))
        if np.abs(codes).max(initial=0) > quant.qmax(32):
            raise ModelError(f"layer {layer}: a bias code overflows int32 (bias too large for its grid)")
        _dequantize_codes(edit, tensors[name], codes.astype(np.int32), fl, hint=f"{layer}/bias_DequantizeLinear")


def _dequantize_codes(edit, tensor, codes: np.ndarray, fl: np.ndarray, *, hint: str) -> None:
    """Every use of `tensor` reads DequantizeLinear(codes, 2^-fl, 0) instead: integer codes as an initializer
    "<name>_quantized", a zero point of the codes' dtype, per-channel (axis 0) when `fl` is a vector."""
    name = tensor.name
    scale = np.exp2(-fl.astype(np.float64)).astype(np.float32)
    inputs = [edit.add_initializer(codes, f"{name}_quantized"), edit.add_initializer(scale, f"{name}_scale"),
              edit.add_initializer(np.zeros(scale.shape, codes.dtype), f"{name}_zero_point")]
    dequantized = edit.variable(f"{name}_dequantized", dtype=np.float32)
    edit.replace_uses(tensor, dequantized)
    edit.add_node("DequantizeLinear", inputs, [dequantized], hint=hint, attrs={"axis": 0} if fl.ndim == 1 else None)


def _dequantize_magnitude_weights(proto: onnx.ModelProto, quantization: dict) -> onnx.ModelProto:
    """A sign-magnitude layer's weight (already on its deployed grid, see quantization.export_mode) -> int16 codes
    "<layer>.weight_quantized" -> DequantizeLinear with scale 2^(s-m); the model moves to opset 21 first."""
    layers = {layer: info for layer, info in quantization.items() if "magnitude_bits" in info}
    if not layers:
        return proto
    from onnx import version_converter

    from passes.graph.edit import GraphEdit

    edit = GraphEdit(version_converter.convert_version(proto, INT16_OPSET))
    tensors = edit.graph.tensors()
    for layer, info in layers.items():
        name = f"{layer}.weight"
        weight = _constant(tensors.get(name))
        if weight is None:
            raise ModelError(f"layer {layer}: its weight {name} is not an initializer of the exported model")
        fl = np.asarray(info["weight_frac_length"], dtype=np.int64)
        per_channel = fl.ndim == 1
        codes = np.rint(weight.astype(np.float64) * np.exp2(fl.reshape(-1, *[1] * (weight.ndim - 1)) if per_channel
                                                            else fl))
        if np.abs(codes).max(initial=0) >= 1 << info["magnitude_bits"]:
            raise ModelError(f"layer {layer}: a weight code exceeds the {info['magnitude_bits']}-bit magnitude")
        _dequantize_codes(edit, tensors[name], codes.astype(np.int16), fl, hint=f"{layer}/weight_DequantizeLinear")
    return edit.to_model()


class _CallableModule(types.ModuleType):
    """`optimizer.training.export` names both this module and its function; calling the module calls the function,
    so `optimizer.training.export(...)` works whichever of the two an earlier import left on the package."""

    def __call__(self, *args: Any, **kwargs: Any) -> onnx.ModelProto:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
