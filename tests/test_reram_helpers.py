"""Independent references for the reram tests: the crossbar scheme of reram-model.md §3.3 as a plain int64 loop,
a direct integer convolution, and tiny ONNX model builders."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def slow_crossbar(u, w, *, rows=128, rows_per_read=None, cell_bits=2, dac_bits=1, input_bits=8, adc_bits=(8,),
                  mode="granular", sign="differential", magnitude_bits=7):
    """acc, conversions, saturated: one explicit ADC conversion per (cycle, slice, polarity, read group, column)."""
    u, w = np.asarray(u, np.int64), np.asarray(w, np.int64)
    k, m = w.shape
    p = rows_per_read or rows
    cycles = math.ceil(input_bits / dac_bits)
    if sign == "offset":
        planes, value_bits = [(w + (1 << magnitude_bits), 1)], magnitude_bits + 1
    else:
        planes, value_bits = [(np.maximum(w, 0), 1), (np.maximum(-w, 0), -1)], magnitude_bits
    slices = math.ceil(value_bits / cell_bits)
    bits = list(adc_bits) * slices if len(adc_bits) == 1 else list(adc_bits)
    groups = [range(g, min(g + p, start + rows, k)) for start in range(0, k, rows)
              for g in range(start, min(start + rows, k), p)]
    acc = np.zeros((u.shape[0], m), np.int64)
    conversions = saturated = 0
    for t in range(cycles):
        digit = (u >> (dac_bits * t)) & ((1 << dac_bits) - 1)
        for s in range(slices):
            cells = [(plane >> (cell_bits * s)) & ((1 << cell_bits) - 1) for plane, _ in planes]
            cell_max = min((1 << cell_bits) - 1, (1 << max(0, value_bits - cell_bits * s)) - 1)
            if sign == "differential_analog":
                signed_cells = [(cells[0] - cells[1], 1)]
            else:
                signed_cells = [(c, polarity) for c, (_, polarity) in zip(cells, planes, strict=True)]
            for c, polarity in signed_cells:
                for group in groups:
                    rows_in = list(group)
                    partial = digit[:, rows_in] @ c[rows_in, :]
                    full = math.ceil(math.log2(p * cell_max * ((1 << dac_bits) - 1) + 1))
                    codes, clipped = _adc(partial, bits[s], mode, full, sign == "differential_analog")
                    conversions += partial.size
                    saturated += clipped
                    acc += polarity * (1 << (dac_bits * t + cell_bits * s)) * codes
    if sign == "offset":
        acc -= (1 << magnitude_bits) * u.sum(axis=1, keepdims=True)
    return acc, conversions, saturated


def _adc(partial, bits, mode, full_bits, signed):
    if signed:
        full_bits += 1
    top = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    shift = max(0, full_bits - bits) if mode == "max" else 0
    codes = (partial + (1 << shift >> 1)) >> shift if shift else partial.copy()
    if mode == "max":
        return codes << shift, 0
    clipped = int(np.count_nonzero(codes > top) + (np.count_nonzero(codes < -top) if signed else 0))
    return np.clip(codes, -top if signed else 0, top), clipped


def int_conv(x, w, *, stride, pads, dilation, groups, pad_value):
    """Direct 2-D integer convolution (int64): x (N, C, H, W), w (M, C/g, kh, kw), pads (top, left, bottom, right)."""
    x = np.pad(np.asarray(x, np.int64), [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])],
               constant_values=pad_value)
    n, c, h, width = x.shape
    m, cg, kh, kw = w.shape
    oh = (h - (kh - 1) * dilation[0] - 1) // stride[0] + 1
    ow = (width - (kw - 1) * dilation[1] - 1) // stride[1] + 1
    out = np.zeros((n, m, oh, ow), np.int64)
    per_group = m // groups
    for o in range(m):
        g = o // per_group
        for i in range(oh):
            for j in range(ow):
                rows = i * stride[0] + dilation[0] * np.arange(kh)
                cols = j * stride[1] + dilation[1] * np.arange(kw)
                patch = x[:, g * cg : (g + 1) * cg][:, :, rows][:, :, :, cols]
                out[:, o, i, j] = (patch * w[o].astype(np.int64)).sum(axis=(1, 2, 3))
    return out


def qdq_model(op, weight, *, x_shape, x_dtype=np.uint8, x_zero_point=0, x_scale=1.0, w_scale=None, bias=None,
              attrs=None, opset=19, w_axis=None):
    """x (float) -> QuantizeLinear -> DequantizeLinear -> op(·, DQ(int8 weight), bias?) -> y, checked."""
    axis = w_axis if w_axis is not None else 0 if op == "Conv" else 1
    w_scale = np.ones(weight.shape[axis], np.float32) if w_scale is None else w_scale
    inits = [numpy_helper.from_array(np.array(x_scale, np.float32), "xs"),
             numpy_helper.from_array(np.array(x_zero_point, x_dtype), "xz"),
             numpy_helper.from_array(weight.astype(np.int8), "wq"),
             numpy_helper.from_array(np.asarray(w_scale, np.float32), "ws")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], axis=axis)]
    inputs = ["xd", "wd"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "b"))
        inputs.append("b")
    nodes.append(helper.make_node(op, inputs, ["y"], name="layer", **(attrs or {})))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * len(x_shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model
