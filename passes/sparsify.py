"""sparsify: magnitude pruning of Conv/Gemm/MatMul weights to a target sparsity, element-wise, in blocks or N:M.

Every weight is seen as a matrix W[out, in]: Gemm/MatMul output features x input features (a Gemm with
transB=0 and a MatMul weight are transposed for this), Conv filters x the flattened (in_channel, kh, kw) axis in
ONNX order. Patterns:

    element   zero the smallest |w|
    RxC       zero whole blocks of R consecutive output rows x C consecutive input columns, the blocks with the
              smallest mean |w| first (edge blocks may be partial). The `tvm` runtime's BSR kernel vectorizes
              over the R rows of a block, so blocks with R >= 8 (16x1, 8x8, 8x1) are the ones that turn into speed
              there; 1x4 or 4x4 suit other engines.
    N:M       in every group of M consecutive input columns of a row keep the N largest |w| (exact per group;
              the sparsity is 1 - N/M, the `sparsity` option is not used; a ragged last group keeps min(N, size))

scope=layer gives each weight the target; scope=global ranks all weights together (one magnitude threshold),
so that the element-weighted total meets the target. Only initializers are pruned; a weight shared by several
nodes is pruned once. The report lists, per weight, the achieved element sparsity and (for blocks) the fraction
of zero blocks, and every Conv/Gemm/MatMul left alone with the reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import numpy_helper

from optimizer import keys
from optimizer.declines import Decline
from optimizer.errors import PassError, UsageError
from optimizer.model import set_metadata
from passes import Pass, PassContext, PassResult, option, register
from passes.base import compile_regex

METADATA_KEY = keys.SPARSIFY
_BLOCK = re.compile(r"^(\d+)x(\d+)$")
_N_OF_M = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class Pattern:
    kind: str  # element | block | n_of_m
    rows: int = 1  # block rows (R), or N of N:M
    cols: int = 1  # block cols (C), or M of N:M

    def __str__(self) -> str:
        if self.kind == "element":
            return "element"
        return f"{self.rows}x{self.cols}" if self.kind == "block" else f"{self.rows}:{self.cols}"


def parse_pattern(text: str) -> Pattern:
    text = text.strip().lower()
    if text == "element":
        return Pattern("element")
    if match := _BLOCK.match(text):
        rows, cols = int(match[1]), int(match[2])
        if rows >= 1 and cols >= 1:
            return Pattern("block", rows, cols) if rows * cols > 1 else Pattern("element")
    if match := _N_OF_M.match(text):
        n, m = int(match[1]), int(match[2])
        if 1 <= n < m:
            return Pattern("n_of_m", n, m)
    raise UsageError(f"pass sparsify: option pattern={text!r} is not element, RxC (e.g. 16x1) or N:M (e.g. 2:4)")


@dataclass
class Target:
    """One prunable initializer, seen as [out, in]."""

    initializer: str
    nodes: list[str]
    op: str
    shape: tuple[int, ...]
    transposed: bool  # the [out, in] view is the transpose of the stored 2-D matrix

    def view(self, array: np.ndarray) -> np.ndarray:
        matrix = array.reshape(array.shape[0], -1) if self.op == "Conv" else array
        return matrix.T if self.transposed else matrix

    def unview(self, matrix: np.ndarray) -> np.ndarray:
        return (matrix.T if self.transposed else matrix).reshape(self.shape)


@register
class Sparsify(Pass):
    name = "sparsify"
    summary = "magnitude pruning of Conv/Gemm/MatMul weights: element, RxC blocks (16x1, 8x8 for tvm) or N:M"
    contract = "approximate"

    @dataclass(frozen=True)
    class Options:
        sparsity: float = option(0.5, "fraction of weights set to zero (element and block patterns)")
        pattern: str = option("element", "element | RxC block, R output rows x C inputs (e.g. 16x1, 8x8) | N:M (2:4)")
        scope: Literal["layer", "global"] = option("layer", "each weight to the target, or one global threshold")
        exclude: str | None = option(None, "regex on node names to leave dense (e.g. the first conv)")

    speedup = True

    def validate(self) -> None:
        if not 0.0 <= self.options.sparsity < 1.0:
            raise UsageError(f"pass sparsify: option sparsity={self.options.sparsity} must be in [0, 1)")
        self.pattern = parse_pattern(self.options.pattern)
        self.exclude = compile_regex(self.name, "exclude", self.options.exclude)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        result = onnx.ModelProto()
        result.CopyFrom(model)
        targets, skipped = find_targets(result, self.exclude)
        if not targets:
            reasons = "; ".join(f"{d.node}: {d.why}" for d in skipped) or "the model has no Conv/Gemm/MatMul"
            raise PassError(f"pass sparsify: nothing to prune ({reasons})")
        initializers = {t.name: t for t in result.graph.initializer}
        matrices = [t.view(numpy_helper.to_array(initializers[t.initializer])) for t in targets]
        masks = prune(matrices, self.pattern, self.options.sparsity, self.options.scope)
        layers = []
        for target, matrix, mask in zip(targets, matrices, masks, strict=True):
            pruned = np.where(mask, matrix, 0).astype(matrix.dtype)
            proto = initializers[target.initializer]
            proto.CopyFrom(numpy_helper.from_array(target.unview(pruned), proto.name))
            layers.append(layer_row(target, pruned, self.pattern))
        total = sum(r["params"] for r in layers)
        zeros = sum(r["params"] * r["sparsity"] for r in layers)
        newly_zeroed = sum(int(np.count_nonzero(~mask & (matrix != 0))) for matrix, mask in zip(matrices, masks,
                                                                                               strict=True))
        if newly_zeroed == 0:
            ctx.warn(f"pass sparsify: pattern={self.pattern} with sparsity={self.options.sparsity:g} zeroed no "
                     "weight (sparsity 0, blocks larger than the weights, or too low a sparsity for one block); the "
                     "model is unchanged")
        settings = {"pattern": str(self.pattern), "sparsity": self.options.sparsity, "scope": self.options.scope}
        set_metadata(result, METADATA_KEY, json.dumps(settings))
        details = {
            "pattern": str(self.pattern),
            "target_sparsity": 1 - self.pattern.rows / self.pattern.cols
            if self.pattern.kind == "n_of_m"
            else self.options.sparsity,
            "achieved_sparsity": round(zeros / total, 6),
            "layers": layers,
            "skipped": [d.as_report() for d in skipped],
        }
        return PassResult(result, details)


def find_targets(model: onnx.ModelProto, exclude: re.Pattern | None) -> tuple[list[Target], list[Decline]]:
    """The weights to prune (one Target per initializer, with every node reading it) and a Decline per node left
    alone."""
    initializers = {t.name: tuple(t.dims) for t in model.graph.initializer}
    by_initializer: dict[str, Target] = {}
    skipped = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        name = node.name or node.output[0]
        if exclude is not None and exclude.search(name):
            skipped.append(Decline(name, node.op_type, "excluded", "excluded by pattern"))
            continue
        weight = node.input[1] if len(node.input) > 1 else ""
        if weight not in initializers:
            skipped.append(Decline(name, node.op_type, "runtime-weight",
                                   f"weight {weight!r} is not an initializer (run cleanup to fold constants)"))
            continue
        shape = initializers[weight]
        transposed = _transposed(node)
        if (
            transposed is None
            or (node.op_type == "Conv" and len(shape) < 3)
            or (node.op_type != "Conv" and len(shape) != 2)
        ):
            skipped.append(Decline(name, node.op_type, "weight-shape",
                                   f"weight of shape {list(shape)} is not a plain matrix or filter bank"))
            continue
        if weight in by_initializer:
            by_initializer[weight].nodes.append(name)
            continue
        by_initializer[weight] = Target(weight, [name], node.op_type, shape, transposed)
    return list(by_initializer.values()), skipped


def _transposed(node: onnx.NodeProto) -> bool | None:
    """Whether the [out, in] view is the stored matrix transposed; None for layouts this pass does not handle."""
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Conv":
        return False
    if node.op_type == "MatMul":
        return True
    if "transA" in attrs and attrs["transA"].i:
        return None
    return not ("transB" in attrs and attrs["transB"].i)


def prune(matrices: list[np.ndarray], pattern: Pattern, sparsity: float, scope: str) -> list[np.ndarray]:
    """Keep-masks, one per [out, in] matrix."""
    if pattern.kind == "n_of_m":
        return [n_of_m_mask(m, pattern.rows, pattern.cols) for m in matrices]
    rows, cols = pattern.rows, pattern.cols
    if scope == "layer":
        return [_keep_strongest_if_empty(m, block_masks([m], rows, cols, sparsity)[0], rows, cols) for m in matrices]
    return block_masks(matrices, rows, cols, sparsity)


def block_masks(matrices: list[np.ndarray], rows: int, cols: int, sparsity: float) -> list[np.ndarray]:
    """Zero the blocks with the smallest mean |w| across all `matrices` until `sparsity` of their elements is reached.

    The cut is placed where the pruned element count is closest to the target, counting real elements only
    (edge blocks are partial). An element pattern is the 1x1 block.
    """
    scores, counts, shapes = [], [], []
    for matrix in matrices:
        magnitude = _blocked(np.abs(matrix.astype(np.float64)), rows, cols)
        present = _blocked(np.ones(matrix.shape), rows, cols)
        count = present.sum(axis=(1, 3))
        scores.append((magnitude.sum(axis=(1, 3)) / count).ravel())
        counts.append(count.ravel())
        shapes.append(count.shape)
    score, count = np.concatenate(scores), np.concatenate(counts)
    order = np.argsort(score, kind="stable")
    pruned_elements = np.concatenate([[0], np.cumsum(count[order])])
    cut = int(np.argmin(np.abs(pruned_elements - sparsity * count.sum())))
    keep = np.ones(len(score), dtype=bool)
    keep[order[:cut]] = False
    masks, start = [], 0
    for matrix, shape in zip(matrices, shapes, strict=True):
        block_keep = keep[start : start + shape[0] * shape[1]].reshape(shape)
        start += shape[0] * shape[1]
        element_keep = np.repeat(np.repeat(block_keep, rows, axis=0), cols, axis=1)
        masks.append(element_keep[: matrix.shape[0], : matrix.shape[1]])
    return masks


def _keep_strongest_if_empty(matrix: np.ndarray, mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A layer-scope cut may round a small matrix with large blocks (16x9 in 8x8 blocks) to all zeros, which cuts
    the network in two; keep its strongest block instead."""
    if mask.any():
        return mask
    magnitude = _blocked(np.abs(matrix.astype(np.float64)), rows, cols).sum(axis=(1, 3))
    r, c = np.unravel_index(int(np.argmax(magnitude)), magnitude.shape)
    mask = mask.copy()
    mask[r * rows : (r + 1) * rows, c * cols : (c + 1) * cols] = True
    return mask


def n_of_m_mask(matrix: np.ndarray, n: int, m: int) -> np.ndarray:
    out, inp = matrix.shape
    groups = -(-inp // m)
    magnitude = np.full((out, groups * m), -1.0)  # padding ranks below every real weight
    magnitude[:, :inp] = np.abs(matrix)
    ranked = np.argsort(-magnitude.reshape(out, groups, m), axis=-1, kind="stable")
    keep = np.zeros((out, groups, m), dtype=bool)
    np.put_along_axis(keep, ranked[..., :n], True, axis=-1)
    return keep.reshape(out, groups * m)[:, :inp]


def _blocked(matrix: np.ndarray, rows: int, cols: int) -> np.ndarray:
    out, inp = matrix.shape
    padded = np.zeros((-(-out // rows) * rows, -(-inp // cols) * cols))
    padded[:out, :inp] = matrix
    return padded.reshape(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)


def layer_row(target: Target, pruned: np.ndarray, pattern: Pattern) -> dict:
    row = {
        "initializer": target.initializer,
        "nodes": target.nodes,
        "op": target.op,
        "matrix": list(pruned.shape),
        "params": int(pruned.size),
        "sparsity": round(float((pruned == 0).mean()), 6),
    }
    if pattern.kind == "block":
        nonzero = np.any(_blocked(pruned != 0, pattern.rows, pattern.cols), axis=(1, 3))
        row["block_sparsity"] = round(float(1 - nonzero.mean()), 6)
    if pattern.kind == "n_of_m":
        row["max_nonzeros_per_group"] = max_nonzeros_per_group(pruned, pattern.cols)
    return row


def max_nonzeros_per_group(matrix: np.ndarray, m: int) -> int:
    out, inp = matrix.shape
    padded = np.zeros((out, -(-inp // m) * m))
    padded[:, :inp] = matrix != 0
    return int(padded.reshape(out, -1, m).sum(axis=-1).max())


