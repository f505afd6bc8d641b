"""`bit-slice`: decompose every quantized weight into crossbar cell slices and plan the ADC resolution per slice.

The graph is not changed (the contract is exact: outputs stay bit-identical). The pass reads each crossbar
weight's integer codes — a DequantizeLinear of an integer initializer feeding Conv/Gemm/MatMul (QDQ; int16 holds
the sign + 8-bit magnitude of `quantize:magnitude_bits=8`, sliced as 9 signed bits: four full 2-bit cells), or the
weight operand of QLinearConv/QLinearMatMul/ConvInteger/MatMulInteger — subtracts the zero point, lays the
codes out as crossbar matrices and splits them with `optimizer.quant.split_slices`.

Crossbar layout (reference/reram-model.md §3.1): rows are the reduction dimension K, columns the outputs.
  Conv W [M, C/g, kh, kw]: one matrix per group g, rows K = (C/g)·kh·kw in ONNX order (c, kh, kw), M/g columns.
  Gemm B: K x N (transposed first when transB = 1). MatMul / QLinearMatMul / MatMulInteger B: 2-D, K x N.
K is cut into tiles of `rows` rows (one crossbar each). With bit-serial inputs of v bits per cycle, a column of
one tile sees at most P = (2^v − 1) · Σ_rows cell values, so an ADC with adc_bits_for(P) bits never saturates.
Toy example: 128 rows of 2-bit cells all at 3, 1-bit inputs: P = 384, 9 bits; int8's top slice (1 bit, max 1):
P = 128, 8 bits.

Slice sparsity is the fraction of weights whose slice digit is zero: for differential sign it is the digit of
|q| (w⁺ and w⁻ never both hold one), for offset sign the digit of the stored q + 2^(b−1).

The plan is stored in model.metadata_props["sculpt.bitslice"] as JSON (read by the reram runtime):
  {
    "version": 1,
    "cell_bits": 2, "sign": "differential" | "offset", "rows": 128, "input_bits_per_cycle": 1,
    "coverage": 1.0,                    # fraction of (column, tile, polarity) reads the plan resolves exactly
    "adc_plan": [b0, b1, ...],          # per slice position, least significant first: max of the layers' plans
    "layers": [{
      "node": "conv1", "op": "Conv", "weight": "conv1.weight_quantized",   # node name, integer initializer name
      "bits": 8,                        # signed weight bits the codes were sliced as
      "cell_bits": 2, "sign": "differential", "rows": 128, "input_bits_per_cycle": 1,
      "offset": 0,                      # added to q before slicing (offset sign: 2^(bits-1)), subtract digitally
      "slices": 4,                      # slice count S; every per-slice list below has S entries, LSB first
      "groups": 1, "k": 144, "columns": 32, "row_tiles": 2,
      "slice_max": [3, 3, 3, 1],        # the largest value each slice can hold
      "slice_sparsity": [0.41, ...],
      "max_column_sum": [211, ...],     # max over tiles, columns, polarities and groups of Σ_rows cell values
      "max_column_sum_per_tile": [[211, 97], ...],   # [slice][row tile]
      "adc_bits_needed": [9, ...],      # no saturation for any input: adc_bits_for((2^v-1) · max_column_sum)
      "adc_bits_worst_case": [9, 9, 9, 8],           # any weights: min(rows, k) cells at slice_max
      "adc_bits_histogram": [{"8": 12, "9": 52}, ...],  # per slice: bits needed -> number of column reads
      "adc_bits": [9, ...]              # the proposed plan for this layer (= needed when coverage is 1)
    }, ...]
  }
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import numpy_helper

from optimizer import keys, quant
from optimizer.declines import Decline
from optimizer.errors import PassError, UsageError
from optimizer.model import metadata_value, set_metadata
from optimizer.plots import slice_sparsity_png
from passes import Artifact, Pass, PassContext, PassResult, option, register
from passes.graph.qdq import METADATA_KEY as QUANT_METADATA_KEY

METADATA_KEY = keys.BITSLICE
CELL_BITS = range(1, 5)
INPUT_BITS = range(1, 9)
MAX_WEIGHT_BITS = 16
CROSSBAR_OPS = ("Conv", "Gemm", "MatMul")
INTEGER_TYPES = {
    onnx.TensorProto.INT8: 8,
    onnx.TensorProto.UINT8: 8,
    onnx.TensorProto.INT16: 16,
    onnx.TensorProto.UINT16: 16,
    onnx.TensorProto.INT4: 4,
    onnx.TensorProto.UINT4: 4,
}


@dataclass(frozen=True)
class WeightSource:
    """Where an op keeps its integer weight: input indices of the codes and zero point, and the matrix layout."""

    weight_input: int
    zero_point_input: int | None
    layout: Literal["conv", "gemm", "matmul"]


DIRECT_SOURCES = {
    "QLinearConv": WeightSource(3, 5, "conv"),
    "QLinearMatMul": WeightSource(3, 5, "matmul"),
    "ConvInteger": WeightSource(1, 3, "conv"),
    "MatMulInteger": WeightSource(1, 3, "matmul"),
}
QDQ_LAYOUTS = {"Conv": "conv", "Gemm": "gemm", "MatMul": "matmul"}


@dataclass(frozen=True)
class QuantizedWeight:
    node: onnx.NodeProto
    name: str
    codes: np.ndarray
    declared_bits: int
    layout: str


@register
class BitSlice(Pass):
    name = "bit-slice"
    summary = "split quantized weights into cell slices; per-slice sparsity, column sums and an ADC-resolution plan"
    contract = "exact"

    @dataclass(frozen=True)
    class Options:
        cell_bits: int = option(2, "bits per ReRAM cell, 1-4")
        sign: Literal["differential", "offset"] = option("differential", "w+/w- array pairs, or q + 2^(bits-1)")
        rows: int = option(128, "crossbar rows (the reduction dimension is cut into tiles of this height)")
        input_bits_per_cycle: int = option(1, "input (DAC) bits applied per cycle, 1-8")
        coverage: float = option(1.0, "fraction of column reads the proposed ADC plan must resolve (1 = all)")
        plot: str | None = option(None, "write a PNG of slice sparsity per layer to this file")

    def validate(self) -> None:
        o = self.options
        if o.cell_bits not in CELL_BITS:
            raise UsageError(f"pass bit-slice: option cell_bits={o.cell_bits} is not supported; use 1, 2, 3 or 4")
        if o.input_bits_per_cycle not in INPUT_BITS:
            raise UsageError(
                f"pass bit-slice: option input_bits_per_cycle={o.input_bits_per_cycle} is not supported; use 1 to 8"
            )
        if o.rows < 1:
            raise UsageError(f"pass bit-slice: option rows={o.rows} must be a positive number of crossbar rows")
        if not 0.0 < o.coverage <= 1.0:
            raise UsageError(f"pass bit-slice: option coverage={o.coverage} must be in (0, 1]")
        if o.plot is not None:
            if Path(o.plot).suffix.lower() != ".png":
                raise UsageError(f"pass bit-slice: option plot={o.plot!r} must name a .png file")
            if not Path(o.plot).resolve().parent.is_dir():
                raise UsageError(f"pass bit-slice: option plot={o.plot!r}: directory does not exist")

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        weights, declines = find_quantized_weights(model)
        if not weights:
            floats = [d for d in declines if d.code == "float-weight"]
            where = f" ({floats[0].op} {floats[0].node!r} has float weights)" if floats else ""
            raise UsageError(
                f"pass bit-slice: the model has no quantized weights{where}; run the quantize pass first, "
                "e.g. --pass quantize --pass bit-slice"
            )
        layers = []
        for index, weight in enumerate(weights):
            ctx.report_progress("bit-slice", index / len(weights))
            layers.append(self._layer(weight))
        plan = _overall_plan(layers)
        settings = {
            "cell_bits": self.options.cell_bits,
            "sign": self.options.sign,
            "rows": self.options.rows,
            "input_bits_per_cycle": self.options.input_bits_per_cycle,
            "coverage": self.options.coverage,
        }
        metadata = {"version": 1, **settings, "adc_plan": plan, "layers": layers}
        result = onnx.ModelProto()
        result.CopyFrom(model)
        set_metadata(result, METADATA_KEY, json.dumps(metadata))
        details = {**settings, "adc_plan": plan, "layers": layers, "declined": [d.as_report() for d in declines]}
        details["metadata_key"] = METADATA_KEY
        artifacts = ()
        if self.options.plot:
            png = slice_sparsity_png(layers, cell_bits=self.options.cell_bits, sign=self.options.sign)
            artifacts = (Artifact(self.options.plot, "bit-slice plot", png),)
            details["plot"] = self.options.plot
        ctx.report_progress("bit-slice", 1.0)
        return PassResult(result, details, artifacts)

    def _layer(self, weight: QuantizedWeight) -> dict:
        o = self.options
        bits = _bits_that_fit(weight.codes, weight.declared_bits, o.sign)
        matrices = crossbar_matrices(weight.codes, weight.layout, weight.node)
        slice_max = quant.slice_max_values(bits, o.cell_bits, o.sign)
        zeros = np.zeros(len(slice_max), dtype=np.int64)
        tile_max = None
        histograms = [Counter() for _ in slice_max]
        offset = 0
        for matrix in matrices:
            slices, offset = quant.split_slices(matrix, bits, o.cell_bits, o.sign)
            digits = slices.sum(axis=1)
            zeros += (digits == 0).reshape(len(slice_max), -1).sum(axis=1)
            sums = quant.column_sums(slices, o.rows)
            group_max = sums.max(axis=(1, 3))
            tile_max = group_max if tile_max is None else np.maximum(tile_max, group_max)
            needed = quant.adc_bits_needed(sums, o.input_bits_per_cycle)
            for s in range(len(slice_max)):
                histograms[s].update(needed[s].reshape(-1).tolist())
        k, columns = matrices[0].shape
        cells = sum(m.size for m in matrices)
        max_sum = tile_max.max(axis=1)
        needed_bits = [int(b) for b in quant.adc_bits_needed(max_sum, o.input_bits_per_cycle)]
        row = {
            "node": weight.node.name,
            "op": weight.node.op_type,
            "weight": weight.name,
            "bits": bits,
            "cell_bits": o.cell_bits,
            "sign": o.sign,
            "rows": o.rows,
            "input_bits_per_cycle": o.input_bits_per_cycle,
            "offset": int(offset),
            "slices": len(slice_max),
            "groups": len(matrices),
            "k": int(k),
            "columns": int(columns),
            "row_tiles": int(tile_max.shape[1]),
            "slice_max": slice_max,
            "slice_sparsity": [round(float(z) / cells, 6) if cells else 1.0 for z in zeros],
            "max_column_sum": [int(v) for v in max_sum],
            "max_column_sum_per_tile": tile_max.astype(int).tolist(),
            "adc_bits_needed": needed_bits,
            "adc_bits_worst_case": [quant.full_adc_bits(min(o.rows, k), m, o.input_bits_per_cycle) for m in slice_max],
            "adc_bits_histogram": [{str(b): n for b, n in sorted(h.items())} for h in histograms],
            "adc_bits": [_covering_bits(h, o.coverage) for h in histograms],
        }
        if bits != weight.declared_bits:
            row["note"] = f"codes exceed the {weight.declared_bits}-bit {o.sign} range; sliced as {bits} bits"
        return row


# --- finding the integer weights -----------------------------------------------------------------------------------


def _declared_bits(model: onnx.ModelProto) -> dict[str, int]:
    """Weight bits recorded by the quantize pass (4-bit weights live in int8 containers)."""
    entry = metadata_value(model, QUANT_METADATA_KEY)
    if entry is None:
        return {}
    try:
        return {name: int(w["bits"]) for name, w in json.loads(entry).get("weights", {}).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise PassError(f"pass bit-slice: metadata {QUANT_METADATA_KEY!r} is not valid ({e})") from e


def find_quantized_weights(model: onnx.ModelProto) -> tuple[list[QuantizedWeight], list[Decline]]:
    """Every crossbar weight with integer codes (zero point removed), and a reason for every one without."""
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    declared = _declared_bits(model)
    weights, declines = [], []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in DIRECT_SOURCES:
            source = DIRECT_SOURCES[node.op_type]
            found = _integer_weight(node, source.weight_input, source.zero_point_input, initializers, None)
            layout = source.layout
        elif node.op_type in QDQ_LAYOUTS:
            found = _qdq_weight(node, initializers, producers)
            layout = QDQ_LAYOUTS[node.op_type]
        else:
            continue
        if isinstance(found, Decline):
            declines.append(found)
            continue
        name, codes, container_bits = found
        if layout == "matmul" and codes.ndim != 2:
            declines.append(Decline(node.name, node.op_type, "weight-rank",
                                    f"weight {name!r} is {codes.ndim}-D, not a 2-D matrix"))
            continue
        weights.append(QuantizedWeight(node, name, codes, declared.get(name, container_bits), layout))
    return weights, declines


def _qdq_weight(node, initializers, producers) -> tuple[str, np.ndarray, int] | Decline:
    if len(node.input) < 2:
        return Decline(node.name, node.op_type, "no-weight", "has no weight input")
    weight = node.input[1]
    if weight in initializers:
        return Decline(node.name, node.op_type, "float-weight", f"float weight {weight!r} (not quantized)")
    dq = producers.get(weight)
    if dq is None or dq.op_type != "DequantizeLinear":
        return Decline(node.name, node.op_type, "runtime-weight",
                       f"weight {weight!r} is computed at run time, not a constant")
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    found = _integer_weight(dq, 0, 2 if len(dq.input) > 2 else None, initializers, axis)
    # the decline names the crossbar op, not the DequantizeLinear that feeds it
    return Decline(node.name, node.op_type, found.code, found.why) if isinstance(found, Decline) else found


def _integer_weight(node, weight_input, zero_point_input, initializers, axis) -> tuple[str, np.ndarray, int] | Decline:
    name = node.input[weight_input]
    tensor = initializers.get(name)
    if tensor is None:
        return Decline(node.name, node.op_type, "runtime-weight", f"integer weight {name!r} is not an initializer")
    if tensor.data_type not in INTEGER_TYPES:
        kind = onnx.TensorProto.DataType.Name(tensor.data_type)
        return Decline(node.name, node.op_type, "weight-type",
                       f"weight {name!r} has type {kind}, not a supported integer")
    codes = numpy_helper.to_array(tensor).astype(np.int64)
    zp_name = (
        node.input[zero_point_input] if zero_point_input is not None and len(node.input) > zero_point_input else ""
    )
    if zp_name:
        if zp_name not in initializers:
            return Decline(node.name, node.op_type, "runtime-zero-point",
                           f"zero point {zp_name!r} is not an initializer")
        zero_point = numpy_helper.to_array(initializers[zp_name]).astype(np.int64)
        codes = codes - _along(zero_point, codes.ndim, axis if axis is not None else _direct_axis(node, codes))
    return name, codes, INTEGER_TYPES[tensor.data_type]


def _direct_axis(node, codes: np.ndarray) -> int:
    """Per-channel zero points of QLinearConv/ConvInteger run along the output channels (axis 0), else last axis."""
    return 0 if "Conv" in node.op_type else codes.ndim - 1


def _along(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if values.ndim == 0 or values.size == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return values.reshape(shape)


def _bits_that_fit(codes: np.ndarray, declared: int, sign: str) -> int:
    """The declared width, widened when codes fall outside it (e.g. -128 in int8 needs 9 bits as w+/w-)."""
    low, high = int(codes.min(initial=0)), int(codes.max(initial=0))
    bits = max(declared, 2)
    while bits <= MAX_WEIGHT_BITS:
        if sign == "differential" and max(-low, high) <= quant.qmax(bits):
            return bits
        if sign == "offset" and -(1 << (bits - 1)) <= low and high < (1 << (bits - 1)):
            return bits
        bits += 1
    raise PassError(f"pass bit-slice: weight codes span {low}..{high}, beyond {MAX_WEIGHT_BITS} bits")


# --- crossbar matrices and their statistics -----------------------------------------------------------------------


def crossbar_matrices(codes: np.ndarray, layout: str, node: onnx.NodeProto) -> list[np.ndarray]:
    """The weight as K x M crossbar matrices: one per Conv group (rows in (c, kh, kw) order), else one."""
    if layout == "conv":
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        per_group = codes.shape[0] // group
        return [codes[g * per_group : (g + 1) * per_group].reshape(per_group, -1).T for g in range(group)]
    if layout == "gemm" and next((a.i for a in node.attribute if a.name == "transB"), 0):
        return [codes.T]
    return [codes]


def _covering_bits(histogram: Counter, coverage: float) -> int:
    """The fewest bits that resolve at least `coverage` of the column reads exactly."""
    total = sum(histogram.values())
    covered = 0
    for bits in sorted(histogram):
        covered += histogram[bits]
        if covered >= coverage * total - 1e-9:
            return int(bits)
    return 1


def _overall_plan(layers: list[dict]) -> list[int]:
    width = max(layer["slices"] for layer in layers)
    return [max((layer["adc_bits"][s] for layer in layers if s < layer["slices"]), default=1) for s in range(width)]

