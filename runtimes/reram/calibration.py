"""Calibration data and static activation ranges for float models (NeuroSim's per-batch min/max is not realistic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from optimizer.data import graph_inputs
from optimizer.errors import RuntimeFailure, UsageError, one_line


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
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    types = _elem_types(model)
    for name in names:
        if name not in outputs and name not in feeds:
            elem_type = types.get(name, onnx.TensorProto.FLOAT)
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise RuntimeFailure(f"runtime reram: onnxruntime cannot load the model for calibration: {one_line(e)}") from e
    fetch = [n for n in names if n not in feeds]
    lows = {n: np.inf for n in names}
    highs = {n: -np.inf for n in names}
    count = next(iter(feeds.values())).shape[0]
    for start in range(0, count, batch):
        part = {k: v[start : start + batch] for k, v in feeds.items()}
        values = dict(zip(fetch, session.run(fetch, part), strict=True)) if fetch else {}
        values.update({n: part[n] for n in names if n in part})
        for n in names:
            lows[n] = min(lows[n], float(np.min(values[n])))
            highs[n] = max(highs[n], float(np.max(values[n])))
    return {n: (lows[n], highs[n]) for n in names}


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is only a hint for output types here
        inferred = model
    infos = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    return {i.name: i.type.tensor_type.elem_type for i in infos if i.type.tensor_type.elem_type}
