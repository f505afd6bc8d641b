"""A layer with a constant weight seen as a linear least-squares problem: rows of inputs, rows of targets.

`LinearLayer.rows(x)` turns the layer's data input into the design rows each output is a linear function of
(im2col for Conv, the K axis for Gemm/MatMul), grouped as [rows, G, d] (G convolution groups, 1 otherwise);
`targets(y)` turns its output into [rows, G, m]; `weights()` gives the current [G, d + 1, m] (bias last) and
`write(W)` the initializer arrays that realise a new one. For a Conv(2->1, k=1) with weight [[a, b]] and bias c,
a pixel (x0, x1) is the row [x0, x1] and the layer is [x0, x1, 1] @ [[a], [b], [c]].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def conv_pads(attrs: dict, spatial: tuple[int, ...], kernel: tuple[int, ...]) -> list[int]:
    """Explicit [begin..., end...] pads of a Conv, auto_pad resolved for the given input spatial shape."""
    nd = len(kernel)
    strides = list(attrs.get("strides", [1] * nd))
    dilations = list(attrs.get("dilations", [1] * nd))
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for s, k, st, d in zip(spatial, kernel, strides, dilations, strict=True):
            total = max(0, (math.ceil(s / st) - 1) * st + (k - 1) * d + 1 - s)
            small = total // 2
            begin.append(small if auto == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
        return begin + end
    if auto == "VALID":
        return [0] * (2 * nd)
    return list(attrs.get("pads", [0] * (2 * nd)))


def im2col(x: np.ndarray, kernel: tuple[int, ...], strides, pads, dilations) -> np.ndarray:
    """[N, C, *S] -> [N * prod(O), C * prod(kernel)], columns ordered (channel, tap) like a Conv weight row."""
    nd = len(kernel)
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    windows = np.lib.stride_tricks.sliding_window_view(padded, extent, axis=tuple(range(2, 2 + nd)))
    picked = windows[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
                     + tuple(slice(None, None, d) for d in dilations)]
    n, c = x.shape[:2]
    out = picked.shape[2:2 + nd]
    order = (0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    return picked.transpose(order).reshape(n * math.prod(out), c * math.prod(kernel))


@dataclass
class LinearLayer:
    """One Conv / Gemm / MatMul(constant B) of a model, with the initializers that hold its weight and bias.

    `x`: its data input; `y`: the tensor it is fitted on (its output, or the output of the bias Add that follows
    a MatMul); `weight`, `bias`: initializer names (bias None when the layer has none and none can be added).
    """

    node: str
    op: str
    x: str
    y: str
    weight: str
    bias: str | None
    attrs: dict
    weight_value: np.ndarray
    bias_value: np.ndarray | None

    @property
    def groups(self) -> int:
        return int(self.attrs.get("group", 1)) if self.op == "Conv" else 1

    @property
    def unknowns(self) -> int:
        """Columns d of `rows` (per group, bias not counted): what each output is a linear function of."""
        w = self.weight_value
        if self.op == "Conv":
            return int(np.prod(w.shape[1:]))
        if self.op == "Gemm":
            return w.shape[1] if self.attrs.get("transB", 0) else w.shape[0]
        return w.shape[0]

    def rows(self, x: np.ndarray) -> np.ndarray:
        """Design rows [rows, G, d] (float64) for one chunk of the layer's input."""
        if self.op == "Conv":
            kernel = tuple(self.weight_value.shape[2:])
            nd = len(kernel)
            pads = conv_pads(self.attrs, tuple(x.shape[2:]), kernel)
            cols = im2col(x.astype(np.float64, copy=False), kernel, list(self.attrs.get("strides", [1] * nd)), pads,
                          list(self.attrs.get("dilations", [1] * nd)))
            return cols.reshape(cols.shape[0], self.groups, -1)
        if self.op == "Gemm":
            a = x.T if self.attrs.get("transA", 0) else x
            return a.astype(np.float64).reshape(a.shape[0], 1, -1)
        return x.astype(np.float64).reshape(-1, 1, x.shape[-1])

    def targets(self, y: np.ndarray, keep: np.ndarray | None = None, dtype=np.float64) -> np.ndarray:
        """Target rows [rows, G, m] from the layer's (original) output; `keep` selects output channels."""
        axis = 1 if self.op == "Conv" else y.ndim - 1
        if keep is not None:
            y = np.compress(keep, y, axis=axis)
        moved = np.moveaxis(y, axis, -1).astype(dtype)
        return moved.reshape(-1, self.groups, moved.shape[-1] // self.groups)

    def weights(self) -> np.ndarray:
        """The current weight as [G, d + 1, m] (last row: the bias), in the units of `rows` and `targets`."""
        w = self.weight_value.astype(np.float64)
        if self.op == "Conv":
            g = self.groups
            per_group = w.reshape(g, w.shape[0] // g, -1)  # [G, m, d]
            body = per_group.transpose(0, 2, 1)
        elif self.op == "Gemm":
            bk = w.T if self.attrs.get("transB", 0) else w
            body = (self.attrs.get("alpha", 1.0) * bk)[None]
        else:
            body = w[None]
        bias = np.zeros(body.shape[0] * body.shape[2]) if self.bias_value is None else self._bias_vector()
        return np.concatenate([body, bias.reshape(body.shape[0], 1, body.shape[2])], axis=1)

    def _bias_vector(self) -> np.ndarray:
        scale = self.attrs.get("beta", 1.0) if self.op == "Gemm" else 1.0
        return scale * np.broadcast_to(self.bias_value.astype(np.float64).reshape(-1), (self._out_channels(),))

    def _out_channels(self) -> int:
        w = self.weight_value
        if self.op == "Conv":
            return w.shape[0]
        if self.op == "Gemm":
            return w.shape[0] if self.attrs.get("transB", 0) else w.shape[1]
        return w.shape[1]

    def write(self, fitted: np.ndarray) -> dict[str, np.ndarray]:
        """Initializer name -> new array realising `fitted` [G, d + 1, m] (dtype and shape as before)."""
        body, bias = fitted[:, :-1, :], fitted[:, -1, :].reshape(-1)
        dtype = self.weight_value.dtype
        if self.op == "Conv":
            weight = body.transpose(0, 2, 1).reshape(self.weight_value.shape)
        elif self.op == "Gemm":
            weight = body[0] / self.attrs.get("alpha", 1.0)
            weight = weight.T if self.attrs.get("transB", 0) else weight
        else:
            weight = body[0]
        arrays = {self.weight: flush_subnormals(weight.astype(dtype))}
        if self.bias is not None:
            scale = self.attrs.get("beta", 1.0) if self.op == "Gemm" else 1.0
            arrays[self.bias] = flush_subnormals((bias / scale).reshape(self.bias_value.shape)
                                                 .astype(self.bias_value.dtype))
        return arrays


def flush_subnormals(array: np.ndarray) -> np.ndarray:
    """`array` with its subnormal floats set to zero. A least-squares fit can leave weights below the smallest
    normal float (1.2e-38 in float32), and x86 CPUs multiply by those dozens of times slower: one refitted 1x1
    Conv of PP-OCRv4 rec with 2108 of them ran 40 ms instead of 0.7 ms in ONNX Runtime. They are worth nothing.

    >>> flush_subnormals(np.array([1e-40, 0.5, -1e-39], dtype=np.float32)).tolist()
    [0.0, 0.5, 0.0]
    """
    if array.dtype.kind != "f":
        return array
    return np.where(np.abs(array) < np.finfo(array.dtype).tiny, np.zeros_like(array), array)


def layer_from_node(model: onnx.ModelProto, node: onnx.NodeProto, target: str, bias: str | None
                    ) -> LinearLayer | None:
    """The LinearLayer of a Conv/Gemm/MatMul whose weight (and bias, if named) are initializers; else None."""
    inits = {t.name: t for t in model.graph.initializer}
    weight_name = node.input[1] if len(node.input) > 1 else ""
    if weight_name not in inits:
        return None
    weight = numpy_helper.to_array(inits[weight_name])
    bias_value = numpy_helper.to_array(inits[bias]) if bias is not None and bias in inits else None
    if bias is not None and bias_value is None:
        return None
    attrs = _attrs(node)
    if node.op_type == "MatMul" and weight.ndim != 2:
        return None
    if node.op_type == "Gemm" and (attrs.get("beta", 1.0) == 0 and bias is not None):
        bias, bias_value = None, None
    return LinearLayer(node.name, node.op_type, node.input[0], target, weight_name, bias, attrs, weight, bias_value)


ROWS_PER_UNKNOWN = 48  # design rows kept per unknown: enough for a well-posed fit, far fewer than all pixels


def sampled_rows(count: int, unknowns: int, chunk_samples: int, total_samples: int, rng: np.random.Generator
                 ) -> np.ndarray | None:
    """Sorted indices of a seeded random subset of a chunk's `count` design rows, so that the whole calibration
    set contributes about ROWS_PER_UNKNOWN rows per unknown (`unknowns` columns plus the bias); None (all rows)
    when that many or fewer. It needs only the counts, so targets can be sampled before their inputs exist.

        >>> sampled_rows(10, 1, 1, 1000, np.random.default_rng(0)) is None
        True
    """
    wanted = int(np.ceil(ROWS_PER_UNKNOWN * (unknowns + 1) * chunk_samples / total_samples))
    if count <= wanted:
        return None
    return np.sort(rng.choice(count, size=wanted, replace=False))


def row_sample(z: np.ndarray, chunk_samples: int, total_samples: int, rng: np.random.Generator,
               others: tuple[np.ndarray, ...] = ()) -> np.ndarray | tuple[np.ndarray, ...]:
    """`sampled_rows` applied to the rows of one chunk `z` [rows, ..., d] (and the same rows of `others`)."""
    rows = sampled_rows(len(z), z.shape[-1], chunk_samples, total_samples, rng)
    if rows is None:
        return (z, *others) if others else z
    return (z[rows], *(o[rows] for o in others)) if others else z[rows]
