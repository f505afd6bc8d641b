"""Calibration data and static activation ranges for float models (NeuroSim's per-batch min/max is not realistic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from optimizer.data import graph_inputs
from optimizer.errors import UsageError


def load_data(value, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Calibration inputs from a dict of arrays or an .npz path (a "labels" entry is ignored)."""
    if isinstance(value, dict):
        data = dict(value)
    else:
        path = Path(value)
        try:
            with np.load(path) as archive:
                data = {k: archive[k] for k in archive.files}
        except (OSError, ValueError) as e:
            raise UsageError(f"runtime reram: cannot read calibration file {path}: {e}") from None
    data.pop("labels", None)
    names = [i.name for i in graph_inputs(model)]
    if len(data) == 1 and len(names) == 1 and names[0] not in data:
        data = {names[0]: next(iter(data.values()))}
    missing = [n for n in names if n not in data]
    if missing:
        raise UsageError(f"runtime reram: calibration data has no array for input {missing[0]!r} "
                         f"(it has {', '.join(data) or 'nothing'})")
    return {n: data[n] for n in names}


def activation_ranges(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str], batch: int
) -> dict[str, tuple[float, float]]:
    """Min and max of each named tensor of the float model over the calibration inputs (ONNX Runtime)."""

    from optimizer.activation_stats import ProbeSession

    session = ProbeSession(model, [n for n in names if n not in feeds], threads=None)
    lows = {n: np.inf for n in names}
    highs = {n: -np.inf for n in names}
    count = next(iter(feeds.values())).shape[0]
    for start in range(0, count, batch):
        part = {k: v[start : start + batch] for k, v in feeds.items()}
        values = {**session.run(part), **part}
        for n in names:
            lows[n] = min(lows[n], float(np.min(values[n])))
            highs[n] = max(highs[n], float(np.max(values[n])))
    return {n: (lows[n], highs[n]) for n in names}
