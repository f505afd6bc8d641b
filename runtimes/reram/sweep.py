"""Accuracy and ADC saturation against ADC resolution (`optimize reram-sweep`), with a PNG plot.

Every point runs the whole evaluation set on the emulator with the same options except adc_bits (one value for
all slices, the bit-slice plan ignored). Two references frame it: the model on ONNX Runtime (float or QDQ
digital result) and the integer baseline, the emulator with ideal ADCs and no device noise, so the quantization
loss (ORT vs integer baseline) reads apart from the analog loss (integer baseline vs each point).
Per-slice points (`--adc-bits-per-slice 1,3,3,3`, most significant slice first, as the bit-slice L1 paper states
its claim) follow the uniform ones and add the saturated conversions of each slice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from optimizer.errors import RuntimeFailure, UsageError
from optimizer.plots import check_plot_path

NOISE_OFF = {"variation": 0.0, "stuck_at": 0.0, "read_noise": 0.0, "on_off": "inf"}


def parse_bits(text: str) -> list[int]:
    """"1-9", "2,4,8" or "1-4,8" -> sorted distinct ADC resolutions."""
    bits: set[int] = set()
    try:
        for part in str(text).split(","):
            low, _, high = part.strip().partition("-")
            first, last = int(low), int(high or low)
            if first > last:
                raise ValueError
            bits.update(range(first, last + 1))
    except ValueError:
        raise UsageError(f"--adc-bits {text!r}: give a range like 1-9 or a list like 2,4,8") from None
    if not bits or min(bits) < 1 or max(bits) > 32:
        raise UsageError(f"--adc-bits {text!r}: resolutions must be between 1 and 32 bits")
    return sorted(bits)


def parse_slice_bits(text: str) -> tuple[int, ...]:
    """"1,3,3,3" (most significant slice first) -> (1, 3, 3, 3); 0 is an ideal ADC."""
    try:
        bits = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        raise UsageError(f"--adc-bits-per-slice {text!r}: give one resolution per slice, most significant first, "
                         "e.g. 1,3,3,3") from None
    if any(b < 0 or b > 32 for b in bits):
        raise UsageError(f"--adc-bits-per-slice {text!r}: resolutions must be between 0 (ideal) and 32 bits")
    return bits


def sweep(
    model: onnx.ModelProto,
    evaluation: dict[str, np.ndarray],
    *,
    adc_bits: list[int],
    options: dict | None = None,
    progress: Callable[[str], None] | None = None,
    per_slice: list[tuple[int, ...]] = (),
    workers: int = 1,
    address: str | None = None,
) -> dict:
    """Accuracy, saturation and energy for each ADC resolution, then for each per-slice plan in `per_slice`
    (most significant slice first). `options` are reram options (strings or values).

    The resolutions are the points of a sweep (optimizer.sweep.engine): `workers`/`address` run them on a local
    Ray or a cluster, with the same result as in this process.
    """
    from optimizer.sweep.engine import execute
    from runtimes.reram import load

    if "labels" not in evaluation:
        raise UsageError("reram-sweep: the evaluation data has no 'labels' array")
    options = {k: v for k, v in (options or {}).items() if k != "adc_bits"}

    def note(text: str) -> None:
        if progress is not None:
            progress(text)

    note("ONNX Runtime reference")
    reference = _ort_accuracy(model, evaluation)
    note("integer baseline (ideal ADCs, no device noise)")
    baseline = load(model, **{**options, **NOISE_OFF, "adc_bits": 0}).evaluate(evaluation)
    outcome = execute(_point, [{"adc_bits": bits} for bits in [*adc_bits, *per_slice]],
                      (model.SerializeToString(), evaluation, options), workers=workers, address=address,
                      on_result=lambda index, result, done, total: note(_label(result["params"]["adc_bits"])))
    if outcome.interrupted:
        raise KeyboardInterrupt
    for result in outcome.results:
        if not result["ok"]:
            raise RuntimeFailure(f"reram-sweep: {_label(result['params']['adc_bits'])}: {result['error']}")
    points = [{k: v for k, v in result.items() if k not in ("params", "ok", "seconds")}
              for result in outcome.results]
    return {
        "ort_accuracy": reference,
        "integer_baseline": baseline["accuracy"],
        "samples": int(np.asarray(evaluation["labels"]).size),
        "points": points,
        "settings": {k: v for k, v in baseline["settings"].items() if k not in NOISE_OFF and k != "adc_bits"},
    }


def _label(bits: int | tuple[int, ...]) -> str:
    return f"ADC {bits} bits" if isinstance(bits, int) else f"ADC {','.join(map(str, bits))} bits (MSB first)"


def _point(inputs: tuple[bytes, dict, dict], params: dict) -> dict:
    """One ADC resolution or per-slice plan on the emulator (a sweep point; module level so that Ray can send it)."""
    from runtimes.reram import load

    model, evaluation, options = inputs
    bits = params["adc_bits"]
    runtime_bits = bits if isinstance(bits, int) else "/".join(map(str, reversed(bits)))
    described = load(onnx.load_from_string(model), **{**options, "adc_bits": runtime_bits}).evaluate(evaluation)
    point = {
        "adc_bits": bits if isinstance(bits, int) else list(bits),
        "accuracy": described["accuracy"],
        "saturation_rate": described["saturation_rate"],
        "saturated_conversions": described["saturated_conversions"],
        "adc_conversions": described["adc_conversions"],
        "energy_pj": described["energy_pj"]["total"],
        "adc_energy_pj": described["energy_pj"].get("adc", 0.0),
        "adc_area_mm2": described["adc_area_mm2"],
        "pj_per_mac": described["pj_per_mac"],
    }
    if not isinstance(bits, int):
        point["saturated_by_slice_msb_first"] = _saturated_by_slice(described, len(bits))
    return point


def _saturated_by_slice(described: dict, slices: int) -> list[int]:
    totals = np.zeros(slices, dtype=np.int64)
    for layer in described["layers"]:
        totals[: len(layer["saturated_by_slice"])] += layer["saturated_by_slice"]
    return [int(v) for v in totals[::-1]]


def _ort_accuracy(model: onnx.ModelProto, evaluation: dict[str, np.ndarray]) -> float:
    from optimizer.verify import top1_accuracy

    return top1_accuracy(model, evaluation)


def table_lines(result: dict) -> list[str]:
    lines = [f"ONNX Runtime top-1 {result['ort_accuracy']:.4f}; integer baseline (ideal ADC) "
             f"{result['integer_baseline']:.4f}; {result['samples']} samples",
             f"{'ADC bits':>8}  {'top-1':>7}  {'saturated':>10}  {'conversions':>14}  {'energy uJ':>10}  {'pJ/MAC':>7}"]
    for p in result["points"]:
        bits = p["adc_bits"] if isinstance(p["adc_bits"], int) else ",".join(map(str, p["adc_bits"]))
        lines.append(f"{bits:>8}  {p['accuracy']:>7.4f}  {p['saturation_rate']:>10.4%}  "
                     f"{p['adc_conversions']:>14,}  {p['energy_pj'] / 1e6:>10.3f}  {p['pj_per_mac']:>7.3f}")
    for p in result["points"]:
        if "saturated_by_slice_msb_first" in p:
            lines.append(f"per-slice ADC {','.join(map(str, p['adc_bits']))} (MSB first): saturated conversions per "
                         f"slice {p['saturated_by_slice_msb_first']}")
    return lines


def write_plot(result: dict, path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = check_plot_path(path)
    uniform = [p for p in result["points"] if isinstance(p["adc_bits"], int)]
    bits = [p["adc_bits"] for p in uniform]
    figure, accuracy_axis = plt.subplots(figsize=(7, 4.2), dpi=120)
    accuracy = [p["accuracy"] for p in uniform]
    accuracy_axis.plot(bits, accuracy, "o-", color="tab:blue", label="top-1 (emulator)")
    accuracy_axis.axhline(result["integer_baseline"], color="tab:blue", linestyle="--", linewidth=1,
                          label="integer baseline (ideal ADC)")
    accuracy_axis.axhline(result["ort_accuracy"], color="gray", linestyle=":", linewidth=1, label="ONNX Runtime")
    accuracy_axis.set_xlabel("ADC bits (every slice)")
    accuracy_axis.set_ylabel("top-1 accuracy", color="tab:blue")
    accuracy_axis.set_ylim(0, 1.02)
    accuracy_axis.set_xticks(bits)
    saturation_axis = accuracy_axis.twinx()
    saturation_axis.plot(bits, [100 * p["saturation_rate"] for p in uniform], "s-", color="tab:red",
                         label="saturated conversions")
    saturation_axis.set_ylabel("saturated ADC conversions (%)", color="tab:red")
    saturation_axis.set_ylim(bottom=0)
    handles = accuracy_axis.get_legend_handles_labels()[0] + saturation_axis.get_legend_handles_labels()[0]
    accuracy_axis.legend(handles=handles, loc="center right", fontsize=8)
    accuracy_axis.set_title(title or "ReRAM emulator: accuracy and ADC saturation against ADC resolution", fontsize=10)
    accuracy_axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
