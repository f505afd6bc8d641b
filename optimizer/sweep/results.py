"""A finished sweep read back: points ranked by the objective, the Pareto front, the terminal table and the PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optimizer.errors import UsageError
from optimizer.io_json import atomic_path
from optimizer.plots import check_plot_path
from optimizer.sweep.spec import METRICS

_FORMATS = {"accuracy": ".4f", "latency_ms": ".3f", "energy_pj": ",.0f", "latency_ns": ",.0f",
            "saturation_rate": ".4%", "macs": ",", "model_params": ",", "model_bytes": ","}
_LABELS = {"accuracy": "top-1 accuracy", "latency_ms": "latency (ms, measured)", "energy_pj": "energy (pJ, cost model)",
           "latency_ns": "latency (ns, cost model)", "saturation_rate": "saturated ADC conversions",
           "macs": "MACs", "model_params": "parameters", "model_bytes": "model bytes"}


def ranking(points: list[dict], objective: str) -> list[int]:
    """Indices of the points, best first by `objective`; points without it (failed ones) come last, in order.

    >>> ranking([{"ok": True, "accuracy": 0.5}, {"ok": False}, {"ok": True, "accuracy": 0.9}], "accuracy")
    [2, 0, 1]
    """
    sign = -1.0 if METRICS[objective] == "max" else 1.0
    scored = [i for i, p in enumerate(points) if p.get("ok") and p.get(objective) is not None]
    rest = [i for i in range(len(points)) if i not in set(scored)]
    return sorted(scored, key=lambda i: (sign * points[i][objective], i)) + rest


def pareto_front(points: list[dict], x: str, y: str = "accuracy") -> list[int]:
    """Indices of the points no other point beats on both `x` and `y` (each in its better direction), by x.

    A point is dominated when another is at least as good on both and better on one; ties keep both.

    >>> pareto_front([{"ok": True, "accuracy": 0.9, "macs": 10}, {"ok": True, "accuracy": 0.8, "macs": 20},
    ...               {"ok": True, "accuracy": 0.7, "macs": 5}], "macs")
    [2, 0]
    """
    def better(metric: str, a: float, b: float) -> bool:
        return a > b if METRICS[metric] == "max" else a < b

    candidates = [i for i, p in enumerate(points) if p.get("ok") and p.get(x) is not None and p.get(y) is not None]
    front = []
    for i in candidates:
        a = points[i]
        dominated = any(
            not better(x, a[x], points[j][x]) and not better(y, a[y], points[j][y])
            and (better(x, points[j][x], a[x]) or better(y, points[j][y], a[y]))
            for j in candidates if j != i
        )
        if not dominated:
            front.append(i)
    sign = 1.0 if METRICS[x] == "min" else -1.0
    return sorted(front, key=lambda i: (sign * points[i][x], i))


def default_pareto_axis(points: list[dict]) -> str | None:
    """Energy when the points have it (reram), else measured latency, else MACs."""
    for metric in ("energy_pj", "latency_ms", "macs"):
        if any(p.get("ok") and p.get(metric) is not None for p in points):
            return metric
    return None


def print_table(result: dict, console=None) -> None:
    """The points as a rich table, sorted by the objective; the Pareto points are marked, failures last."""
    from rich.console import Console
    from rich.table import Table

    points, objective = result["points"], result["objective"]
    names = list(points[0]["params"]) if points else []
    metrics = [m for m in METRICS if any(p.get(m) is not None for p in points)]
    front = set(result.get("pareto", {}).get("points", []))
    better = "higher" if METRICS[objective] == "max" else "lower"
    title = f"sweep: {len(points)} points sorted by {objective} ({better} is better); * = on the Pareto front"
    table = Table(title=title, title_justify="left")
    for column in ("#", *names, *metrics, "seconds", ""):
        table.add_column(column, justify="left" if column in names or column == "" else "right")
    for index in ranking(points, objective):
        point = points[index]
        cells = [_cell(point["params"][n]) for n in names]
        if point["ok"]:
            values = [_metric_cell(m, point.get(m)) for m in metrics]
            note = "*" if index in front else ""
        else:
            values = ["-"] * len(metrics)
            note = f"[red]failed:[/red] {point['error']}"
        table.add_row(str(index), *cells, *values, f"{point.get('seconds', 0):.2f}", note)
    (console or Console(highlight=False, width=160)).print(table)


def write_plot(result: dict, path: str | Path, title: str = "") -> None:
    """Every finished point as a dot of (x, y), the Pareto front as a line, its points labelled with their values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = check_plot_path(path)
    pareto = result.get("pareto")
    if not pareto:
        raise UsageError("--plot: no point has the metrics for a Pareto front (accuracy needs eval: data)")
    x, y = pareto["x"], pareto["y"]
    points = [p for p in result["points"] if p.get("ok") and p.get(x) is not None and p.get(y) is not None]
    front = [result["points"][i] for i in pareto["points"]]
    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=110)
    axis.scatter([p[x] for p in points], [p[y] for p in points], color="tab:gray", alpha=0.6, label="points")
    axis.plot([p[x] for p in front], [p[y] for p in front], "o-", color="tab:blue", label="Pareto front")
    labels: dict[tuple[float, float], list[str]] = {}
    for point in front:  # points tied on both metrics share one label
        labels.setdefault((point[x], point[y]), []).append(_params_label(point["params"]))
    middle = (min(p[x] for p in front) + max(p[x] for p in front)) / 2
    for (px, py), texts in labels.items():
        right_half = px > middle
        axis.annotate("\n".join(texts), (px, py), textcoords="offset points", xytext=(-6 if right_half else 6, -4),
                      ha="right" if right_half else "left", va="top", fontsize=7)
    axis.set_xlabel(_LABELS[x])
    axis.set_ylabel(_LABELS[y])
    axis.set_title(title or f"sweep: {_LABELS[y]} against {_LABELS[x]}", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


def _params_label(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_cell(v)}" for k, v in params.items())


def _cell(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _metric_cell(metric: str, value: Any) -> str:
    return "-" if value is None else format(value, _FORMATS[metric])
