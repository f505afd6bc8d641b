"""Options of the reram runtime: one dataclass with the specification's defaults, parsed from strings or a YAML file.

Values arrive as strings from the CLI (`--reram adc_bits=3/3/3/1,seed=1`), as typed values from Python or as
YAML scalars/lists from `config=FILE.yaml`. Unknown keys and malformed values raise UsageError naming them.
Defaults and their sources: ../../shared/reference/reram-model.md §3.2.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from optimizer.errors import UsageError
from optimizer.options import parse_options as parse_typed_options


@dataclass(frozen=True)
class ReramOptions:
    """Crossbar geometry, converters, non-idealities and run settings (every default from reram-model.md §3.2).

    adc_bits: one value for every slice, or one per slice least significant first; 0 means an ideal ADC;
      None means the model's `sculpt.bitslice` plan where it names the layer, else 8.
    stuck_at: probability of (stuck-at-0, stuck-at-1) per cell.
    on_off: G_max/G_min; math.inf is an ideal device.
    calibration: input name -> array, or an .npz path; used for float models' activation ranges and for
      adc_range=calibrated. Without it the first batch run calibrates.
    fast_path: skip the bit-serial simulation of columns that provably cannot saturate (off: simulate all).
    threads: BLAS threads numpy may use while the emulator runs (None: numpy's default); the digital ops'
      ONNX Runtime sessions use the same number of intra-op threads.
    """

    rows: int = 128
    cols: int = 128
    parallel_rows: int | None = None
    cell_bits: int = 2
    weight_bits: int = 8
    activation_bits: int = 8
    dac_bits: int = 1
    adc_bits: tuple[int, ...] | None = field(default=None, metadata={"parse": lambda v: parse_adc_bits(v)})
    adc_range: Literal["granular", "max", "calibrated"] = "granular"
    sign: Literal["differential", "differential_analog", "offset"] = "differential"
    cols_per_adc: int | None = None
    adc_energy: Literal["linear", "exp"] = "linear"
    t_cycle_ns: float = 100.0
    tile_overhead: bool = False
    variation: float = 0.0
    stuck_at: tuple[float, float] = field(default=(0.0, 0.0), metadata={"parse": lambda v: _stuck_at(v)})
    read_noise: float = 0.0
    on_off: float = field(default=math.inf, metadata={"parse": lambda v: _on_off(v)})
    seed: int = 0
    fast_path: bool = True
    batch: int = 512
    threads: int | None = None
    calibration: Any = field(default=None, compare=False)

    @property
    def rows_per_read(self) -> int:
        return self.parallel_rows or self.rows

    @property
    def adc_cols(self) -> int:
        return self.cols_per_adc or self.cols

    @property
    def noisy(self) -> bool:
        return self.variation > 0 or any(p > 0 for p in self.stuck_at) or self.read_noise > 0 or not math.isinf(
            self.on_off
        )

    def resolved(self) -> dict:
        """The settings as plain JSON values, for reports."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "calibration"}
        values["parallel_rows"] = self.rows_per_read
        values["cols_per_adc"] = self.adc_cols
        values["adc_bits"] = list(self.adc_bits) if self.adc_bits is not None else None
        values["stuck_at"] = list(self.stuck_at)
        values["on_off"] = None if math.isinf(self.on_off) else self.on_off
        return values


def parse_options(values: dict[str, Any]) -> ReramOptions:
    """Typed options from CLI strings, YAML values or Python values. `config=PATH` reads a YAML file first;
    keys given next to it override the file."""
    values = {k.replace("-", "_"): v for k, v in values.items()}
    config_path = values.pop("config", None)
    merged = {**(load_config_file(config_path) if config_path else {}), **values}
    known = {f.name for f in dataclasses.fields(ReramOptions)}
    unknown = [k for k in merged if k not in known]
    if unknown:
        listed = ", ".join(["config", *sorted(known)])
        raise UsageError(f"runtime reram: unknown option {unknown[0]!r}; options are: {listed}")
    options = parse_typed_options(ReramOptions, merged, where="runtime reram")
    _validate(options)
    return options


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML mapping (optionally nested under a top-level `reram:` key)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UsageError(f"runtime reram: cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"runtime reram: config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if isinstance(data, dict) and set(data) == {"reram"}:
        data = data["reram"]
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"runtime reram: config file {path} must hold a mapping of option: value")
    if "config" in data:
        raise UsageError(f"runtime reram: config file {path} may not name another config file")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_adc_bits(value: Any) -> tuple[int, ...] | None:
    """`8`, `"3/3/3/1"` (least significant slice first), [3, 3, 3, 1] -> a tuple; None/"auto" -> None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "auto", "plan")):
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.split("/")]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    try:
        bits = tuple(_int(p) for p in parts)
    except ValueError:
        raise UsageError(f"runtime reram: adc_bits={value!r} must be an integer or integers separated by '/' "
                         "(least significant slice first), e.g. adc_bits=3/3/3/1") from None
    if not bits or any(b < 0 or b > 32 for b in bits):
        raise UsageError(f"runtime reram: adc_bits={value!r} must be between 0 (ideal) and 32 bits")
    return bits


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError
        return int(value)
    return int(str(value).strip())


def _stuck_at(value: Any) -> tuple[float, float]:
    """`0.001` (both faults) or `0.001/0.002` (stuck-at-0 / stuck-at-1)."""
    if isinstance(value, str):
        parts = value.split("/")
    else:
        parts = list(value) if isinstance(value, (list, tuple)) else [value]
    probs = [float(p) for p in parts]
    if len(probs) == 1:
        probs = probs * 2
    if len(probs) != 2 or any(not 0 <= p <= 1 for p in probs) or sum(probs) > 1:
        raise ValueError
    return probs[0], probs[1]


def _on_off(value: Any) -> float:
    if value is None or str(value).lower() in ("inf", "none", "ideal", "0"):
        return math.inf
    ratio = float(value)
    if ratio <= 1:
        raise ValueError
    return ratio


def _validate(o: ReramOptions) -> None:
    positive = {"rows": o.rows, "cols": o.cols, "cell_bits": o.cell_bits, "weight_bits": o.weight_bits,
                "activation_bits": o.activation_bits, "dac_bits": o.dac_bits, "batch": o.batch}
    for key, value in positive.items():
        if value < 1:
            raise UsageError(f"runtime reram: option {key}={value} must be at least 1")
    if o.weight_bits < 2 or o.activation_bits > 16 or o.weight_bits > 16:
        raise UsageError("runtime reram: weight_bits must be 2..16 and activation_bits 1..16")
    if o.dac_bits > o.activation_bits:
        raise UsageError(f"runtime reram: dac_bits={o.dac_bits} exceeds activation_bits={o.activation_bits}")
    if o.parallel_rows is not None and not 1 <= o.parallel_rows <= o.rows:
        raise UsageError(f"runtime reram: parallel_rows={o.parallel_rows} must be between 1 and rows={o.rows}")
    if o.cols_per_adc is not None and not 1 <= o.cols_per_adc <= o.cols:
        raise UsageError(f"runtime reram: cols_per_adc={o.cols_per_adc} must be between 1 and cols={o.cols}")
    largest_partial_sum = o.rows_per_read * ((1 << o.cell_bits) - 1) * ((1 << o.dac_bits) - 1)
    if largest_partial_sum >= 1 << 24:
        raise UsageError(f"runtime reram: parallel_rows × cell levels × DAC levels = {largest_partial_sum} exceeds "
                         "2^24, beyond exact float32 column sums; use fewer rows per read, cell_bits or dac_bits")
    if o.t_cycle_ns <= 0 or o.variation < 0 or o.read_noise < 0:
        raise UsageError("runtime reram: t_cycle_ns must be positive; variation and read_noise non-negative")
