"""Sweep specs: the YAML file (or dict) that names a model, its data, a base recipe and the axes to sweep.

```yaml
model: cnn.onnx                 # paths are relative to the spec file
calibration: calibration.npz
eval: eval.npz
passes: ["structured-sparse:ratio={ratio},criterion={criterion}"]
axes: {ratio: [0.25, 0.5, 0.75], criterion: [l1, l2]}
objective: accuracy             # what the table is sorted by
```

`axes` values are lists or inclusive ranges (`{range: [first, last, step]}`, step 1 when left out); the sweep
is their product in the order written (the last axis varies fastest). `points:` (a list of mappings) gives
the points instead. `{name}` in a pass string, a pass option, a runtime option or `seed:` is replaced by the
point's value; a value that is exactly `"{name}"` takes the value's own type.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizer.errors import UsageError

# what a point can report, and which way is better; the table sorts by the objective, the front uses x and y
METRICS = {
    "accuracy": "max",
    "latency_ms": "min",
    "energy_pj": "min",
    "latency_ns": "min",
    "saturation_rate": "min",
    "macs": "min",
    "model_params": "min",
    "model_bytes": "min",
}
RUNTIMES = ("ort", "reram", "tvm")
_KEYS = ("model", "calibration", "eval", "passes", "axes", "points", "runtime", "runtime_options", "seed",
         "tolerance", "threads", "bench", "objective", "pareto")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class BenchSettings:
    """Latency measured per point with the `optimize bench` harness (batch of seeded random inputs)."""

    runs: int = 10
    warmup: int = 2
    batch: int = 1


@dataclass(frozen=True)
class SweepSpec:
    """A parsed spec. `points` are the parameter mappings in sweep order; templates keep their `{name}`s."""

    points: tuple[dict[str, Any], ...]
    model: Path | None = None
    calibration: Path | None = None
    eval: Path | None = None
    passes: tuple[Any, ...] = ()
    runtime: str = "ort"
    runtime_options: dict[str, Any] = field(default_factory=dict)
    seed: Any = 0
    tolerance: float = 1e-4
    threads: int = 1
    bench: BenchSettings | None = None
    objective: str = "accuracy"
    pareto: tuple[str, str] | None = None
    source: str = "<spec>"

    @property
    def names(self) -> list[str]:
        """The parameter names, in the order of the first point."""
        return list(self.points[0]) if self.points else []


def load_spec(spec: str | os.PathLike | dict, *, base_dir: str | os.PathLike | None = None,
              custom_task: bool = False) -> SweepSpec:
    """Parse a spec file (YAML) or mapping. Paths resolve against the spec file's directory (or `base_dir`).

    With `custom_task` (a Python task runs the points) the model is optional and axes need not appear in a
    template, since the task reads the parameters itself.

    >>> load_spec({"axes": {"seed": {"range": [0, 2]}}}, custom_task=True).points
    ({'seed': 0}, {'seed': 1}, {'seed': 2})
    """
    if isinstance(spec, dict):
        raw, source, base = dict(spec), "<spec>", Path(base_dir or ".")
    else:
        path = Path(spec)
        raw, source, base = _read_yaml(path), str(path), Path(base_dir) if base_dir else path.parent
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise UsageError(f"{source}: unknown key {unknown[0]!r} (allowed: {', '.join(_KEYS)})")
    points = _points(raw, source)
    runtime = str(raw.get("runtime", "ort"))
    if runtime not in RUNTIMES:
        raise UsageError(f"{source}: runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    options = raw.get("runtime_options") or {}
    if not isinstance(options, dict):
        raise UsageError(f"{source}: runtime_options must be a mapping of option: value")
    if "config" in options:
        options = {**options, "config": str(_resolve(base, options["config"]))}
    passes = raw.get("passes") or []
    if not isinstance(passes, list):
        raise UsageError(f"{source}: passes must be a list of pass strings or {{name: {{options}}}} mappings")
    parsed = SweepSpec(
        points=points,
        model=_path(base, raw, "model", source, required=not custom_task),
        calibration=_path(base, raw, "calibration", source),
        eval=_path(base, raw, "eval", source),
        passes=tuple(_pass_entry(entry, source) for entry in passes),
        runtime=runtime,
        runtime_options=options,
        seed=raw.get("seed", 0),
        tolerance=_number(raw, "tolerance", float, 1e-4, source),
        threads=_number(raw, "threads", int, 1, source),
        bench=_bench(raw.get("bench"), source),
        objective=_metric(raw.get("objective", "accuracy"), "objective", source),
        pareto=_pareto(raw.get("pareto"), source),
        source=source,
    )
    if not custom_task:
        _check_placeholders(parsed)
    return parsed


def substitute(template: Any, params: dict[str, Any]) -> Any:
    """Fill `{name}` placeholders from `params`, recursively through lists and mappings.

    >>> substitute("structured-sparse:ratio={ratio}", {"ratio": 0.5})
    'structured-sparse:ratio=0.5'
    >>> substitute({"adc_bits": "{bits}"}, {"bits": 4})
    {'adc_bits': 4}
    """
    if isinstance(template, str):
        whole = _PLACEHOLDER.fullmatch(template)
        if whole and whole.group(1) in params:
            return params[whole.group(1)]
        return _PLACEHOLDER.sub(lambda m: _text(params[m.group(1)]) if m.group(1) in params else m.group(0),
                                template)
    if isinstance(template, dict):
        return {k: substitute(v, params) for k, v in template.items()}
    if isinstance(template, (list, tuple)):
        return type(template)(substitute(v, params) for v in template)
    return template


def expand_axis(name: str, values: Any, source: str = "<spec>") -> list[Any]:
    """An axis as a list: a YAML list, a scalar, or `{range: [first, last, step]}` (inclusive of `last`).

    >>> expand_axis("ratio", {"range": [0.1, 0.5, 0.2]})
    [0.1, 0.3, 0.5]
    """
    if isinstance(values, dict):
        if set(values) != {"range"} or not isinstance(values["range"], list) or len(values["range"]) not in (2, 3):
            raise UsageError(f"{source}: axis {name!r}: a range is {{range: [first, last]}} or "
                             "{range: [first, last, step]}")
        return _range(name, *values["range"], source=source)
    if isinstance(values, list):
        if not values:
            raise UsageError(f"{source}: axis {name!r} has no values")
        return list(values)
    return [values]


def _range(name: str, first: Any, last: Any, step: Any = 1, *, source: str) -> list[Any]:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (first, last, step)):
        raise UsageError(f"{source}: axis {name!r}: range bounds and step must be numbers")
    if step <= 0 or last < first:
        raise UsageError(f"{source}: axis {name!r}: range needs first <= last and a positive step")
    count = math.floor((last - first) / step + 1e-9) + 1
    if all(isinstance(v, int) for v in (first, last, step)):
        return [first + i * step for i in range(count)]
    return [round(first + i * step, 12) for i in range(count)]  # 0.1 + 2 * 0.2 is 0.5, not 0.5000000000000001


def _points(raw: dict, source: str) -> tuple[dict[str, Any], ...]:
    axes, listed = raw.get("axes"), raw.get("points")
    if axes is not None and listed is not None:
        raise UsageError(f"{source}: give either axes: (their product is swept) or points:, not both")
    if listed is not None:
        if not isinstance(listed, list) or not listed or not all(isinstance(p, dict) for p in listed):
            raise UsageError(f"{source}: points must be a non-empty list of {{name: value}} mappings")
        names = set(listed[0])
        for number, point in enumerate(listed, 1):
            if set(point) != names:
                raise UsageError(f"{source}: point {number} names {sorted(point)}, the first names {sorted(names)}")
        return tuple(dict(p) for p in listed)
    if axes is None:
        return ({},)
    if not isinstance(axes, dict) or not axes:
        raise UsageError(f"{source}: axes must be a mapping of name: [values]")
    lists = {str(name): expand_axis(str(name), values, source) for name, values in axes.items()}
    return tuple(dict(zip(lists, combo, strict=True)) for combo in itertools.product(*lists.values()))


def _check_placeholders(spec: SweepSpec) -> None:
    """Every `{name}` names an axis and every axis is used, so a typo is a usage error, not a silent no-op."""
    used = set(_PLACEHOLDER.findall(repr((spec.passes, spec.runtime_options, spec.seed))))
    names = set(spec.names)
    unknown = sorted(used - names)
    if unknown:
        raise UsageError(f"{spec.source}: {{{unknown[0]}}} is not an axis (axes: {', '.join(spec.names) or 'none'})")
    unused = [n for n in spec.names if n not in used]
    if unused:
        raise UsageError(f"{spec.source}: axis {unused[0]!r} appears in no pass, runtime option or seed; "
                         f"write {{{unused[0]}}} where it goes")


def _pass_entry(entry: Any, source: str) -> Any:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and len(entry) == 1:
        name, options = next(iter(entry.items()))
        if options is not None and not isinstance(options, dict):
            raise UsageError(f"{source}: options of pass {name!r} must be a mapping")
        return (str(name), dict(options or {}))
    raise UsageError(f"{source}: each pass is a string or a one-key mapping name: {{options}}, got {entry!r}")


def _bench(value: Any, source: str) -> BenchSettings | None:
    if value is None or value is False:
        return None
    if value is True:
        return BenchSettings()
    if not isinstance(value, dict) or set(value) - {"runs", "warmup", "batch"}:
        raise UsageError(f"{source}: bench is true or a mapping of runs, warmup, batch")
    settings = BenchSettings(**{k: _number(value, k, int, None, source) for k in value})
    if settings.runs < 1 or settings.warmup < 0 or settings.batch < 1:
        raise UsageError(f"{source}: bench needs runs >= 1, warmup >= 0, batch >= 1")
    return settings


def _pareto(value: Any, source: str) -> tuple[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"x", "y"} or "x" not in value:
        raise UsageError(f"{source}: pareto is a mapping {{x: METRIC, y: METRIC}} (y defaults to accuracy)")
    return _metric(value["x"], "pareto x", source), _metric(value.get("y", "accuracy"), "pareto y", source)


def _metric(value: Any, what: str, source: str) -> str:
    if value not in METRICS:
        raise UsageError(f"{source}: {what} {value!r}: use one of {', '.join(METRICS)}")
    return str(value)


def _number(raw: dict, key: str, kind: type, default: Any, source: str) -> Any:
    if key not in raw:
        return default
    try:
        return kind(raw[key])  # YAML reads 1e-5 (no dot) as a string
    except (TypeError, ValueError):
        raise UsageError(f"{source}: {key}: {raw[key]!r} is not a valid {kind.__name__}") from None


def _path(base: Path, raw: dict, key: str, source: str, required: bool = False) -> Path | None:
    if raw.get(key) is None:
        if required:
            raise UsageError(f"{source}: the spec needs a {key}: path")
        return None
    path = _resolve(base, raw[key])
    if not path.exists():
        raise UsageError(f"{source}: {key}: {path} does not exist")
    return path


def _resolve(base: Path, value: Any) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else base / path


def _read_yaml(path: Path) -> dict:
    import yaml

    if not path.exists():
        raise UsageError(f"{path}: no such sweep spec")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: a sweep spec is a mapping (model:, passes:, axes:, ...)")
    return raw


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
