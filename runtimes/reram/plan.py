"""Reading what earlier passes stored in the model: the `bit-slice` ADC plan and the `quantize` weight bits.

model.metadata_props["sculpt.bitslice"] (passes/bit_slice.py) is
  {"version": 1, "cell_bits": 2, "sign": "differential", ..., "layers": [
      {"node": "conv1", "weight": "conv1.weight_quantized", "bits": 8, "cell_bits": 2, "sign": "differential",
       "slices": 4, "adc_bits": [9, 9, 9, 8], ...}, ...]}
with ADC bits least significant slice first. Also accepted: a bare list of such entries, or a mapping
node name -> {"adc_bits": [...]} or node name -> [...]. model.metadata_props["sculpt.quant"] (passes/quantize.py)
gives {"weights": {initializer: {"bits": 4}}}: the signed bits the weight codes were quantized to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import onnx

from optimizer import keys
from optimizer.errors import ModelError
from optimizer.model import metadata_value
from optimizer.quant import QUANT_METADATA_KEY

PLAN_KEY = keys.BITSLICE
QUANT_KEY = QUANT_METADATA_KEY


@dataclass(frozen=True)
class PlanEntry:
    adc_bits: tuple[int, ...]
    bits: int | None = None
    cell_bits: int | None = None
    sign: str | None = None


@dataclass
class BitslicePlan:
    """Plan entries keyed by node name and by integer weight initializer name."""

    entries: dict[str, PlanEntry] = field(default_factory=dict)

    def find(self, keys: tuple[str, ...]) -> PlanEntry | None:
        return next((self.entries[k] for k in keys if k in self.entries), None)


def read_plan(model: onnx.ModelProto) -> BitslicePlan:
    data = _metadata_json(model, PLAN_KEY)
    plan = BitslicePlan()
    if data is None:
        return plan
    defaults = data if isinstance(data, dict) else {}
    if isinstance(data, dict):
        layers = data.get("layers")
        if layers is None:
            layers = {k: v for k, v in data.items() if isinstance(v, (list, dict))}
    else:
        layers = data
    pairs = layers.items() if isinstance(layers, dict) else ((None, e) for e in layers)
    for key, raw in pairs:
        entry = raw if isinstance(raw, dict) else {"adc_bits": raw}
        names = [n for n in (key, entry.get("node"), entry.get("name"), entry.get("weight")) if n]
        if not names or entry.get("adc_bits") is None:
            continue
        parsed = _entry(entry, defaults, names[0])
        for name in names:
            plan.entries[str(name)] = parsed
    return plan


def declared_weight_bits(model: onnx.ModelProto) -> dict[str, int]:
    """Integer weight initializer name -> signed bits recorded by the quantize pass."""
    data = _metadata_json(model, QUANT_KEY)
    if not isinstance(data, dict):
        return {}
    weights = data.get("weights", {})
    if not isinstance(weights, dict):
        return {}
    return {name: int(entry["bits"]) for name, entry in weights.items()
            if isinstance(entry, dict) and isinstance(entry.get("bits"), int)}


def _entry(entry: dict, defaults: dict, name: str) -> PlanEntry:
    bits = entry["adc_bits"]
    try:
        adc_bits = tuple(int(b) for b in ([bits] if isinstance(bits, int) else bits))
    except (TypeError, ValueError):
        raise ModelError(f"metadata {PLAN_KEY}: layer {name!r} has adc_bits={bits!r}; expected a list of integers, "
                         "least significant slice first") from None
    cell_bits = entry.get("cell_bits", defaults.get("cell_bits"))
    return PlanEntry(
        adc_bits=adc_bits,
        bits=int(entry["bits"]) if isinstance(entry.get("bits"), int) else None,
        cell_bits=int(cell_bits) if isinstance(cell_bits, int) else None,
        sign=entry.get("sign", defaults.get("sign")),
    )


def _metadata_json(model: onnx.ModelProto, key: str):
    text = metadata_value(model, key)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelError(f"metadata {key} is not valid JSON ({e.msg}); re-run the pass that wrote it") from None
