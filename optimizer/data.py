"""Calibration and evaluation data: .npz files holding one array per model input, plus optional "labels"."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import onnx

from optimizer.errors import RuntimeFailure, UsageError

LABELS = "labels"

_ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.UINT16: np.uint16,
    onnx.TensorProto.BOOL: np.bool_,
}


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: graph inputs that are not initializers (old exporters list weights as inputs too)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def input_spec(value: onnx.ValueInfoProto, batch: int = 1) -> tuple[tuple[int, ...], np.dtype]:
    """Concrete shape (a dynamic dim takes `batch`) and numpy dtype of a graph input."""
    tensor = value.type.tensor_type
    if tensor.elem_type not in _ONNX_TO_NUMPY:
        raise UsageError(f"input {value.name!r}: element type {onnx.TensorProto.DataType.Name(tensor.elem_type)} "
                         "is not supported for generated data; pass real inputs with --input/--calibration")
    shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else batch for d in tensor.shape.dim)
    return shape, np.dtype(_ONNX_TO_NUMPY[tensor.elem_type])


def random_inputs(model: onnx.ModelProto, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs valid for each input's dtype: N(0,1) floats, small non-negative integers (token ids), booleans."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in graph_inputs(model):
        shape, dtype = input_spec(value, batch)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.random(shape) < 0.5
        else:
            feeds[value.name] = rng.integers(0, min(np.iinfo(dtype).max, 100), size=shape).astype(dtype)
    return feeds


def load_npz(path: str | os.PathLike, model: onnx.ModelProto | None = None) -> dict[str, np.ndarray]:
    """Read an .npz; with a model, check that it holds every input with a compatible rank, dtype and fixed dims."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UsageError(f"{path}: not a readable .npz file ({e})") from e
    if model is not None:
        check_feeds(data, model, str(path))
    return data


def check_feeds(data: dict[str, np.ndarray], model: onnx.ModelProto, where: str) -> None:
    inputs = graph_inputs(model)
    names = [i.name for i in inputs]
    missing = [n for n in names if n not in data]
    if missing:
        have = ", ".join(k for k in data if k != LABELS) or "(none)"
        raise UsageError(f"{where}: has no array for model input {missing[0]!r} (model inputs: {', '.join(names)}; "
                         f"file has: {have})")
    extra = [k for k in data if k not in names and k != LABELS]
    if extra:
        raise UsageError(f"{where}: array {extra[0]!r} is not a model input (model inputs: {', '.join(names)})")
    batches = set()
    for value in inputs:
        array = data[value.name]
        dims = value.type.tensor_type.shape.dim
        expected_dtype = input_spec(value)[1]
        if array.dtype != expected_dtype:
            raise UsageError(
                f"{where}: array {value.name!r} has dtype {array.dtype}, the model expects {expected_dtype}"
            )
        if array.ndim != len(dims):
            raise UsageError(f"{where}: array {value.name!r} has shape {list(array.shape)}, the model expects "
                             f"rank {len(dims)} ({_describe_dims(dims)})")
        chunked_axis = 0 if fixed_batch(inputs) is not None else None  # fed in chunks of the fixed batch
        for axis, (size, dim) in enumerate(zip(array.shape, dims, strict=True)):
            if axis == chunked_axis:
                continue
            if dim.HasField("dim_value") and dim.dim_value > 0 and size != dim.dim_value:
                raise UsageError(f"{where}: array {value.name!r} has shape {list(array.shape)}, the model expects "
                                 f"{_describe_dims(dims)} (axis {axis})")
        if array.ndim:
            batches.add(array.shape[0])
    if LABELS in data and batches and len(data[LABELS]) not in batches:
        raise UsageError(f"{where}: {len(data[LABELS])} labels for {batches.pop()} samples")


def _describe_dims(dims) -> str:
    return "[" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims) + "]"


def split_labels(data: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    feeds = {k: v for k, v in data.items() if k != LABELS}
    return feeds, data.get(LABELS)


def batches(feeds: dict[str, np.ndarray], size: int):
    """Yield slices of every array along axis 0; scalars (a sample rate, a threshold) go whole into every slice."""
    n = max((len(v) for v in feeds.values() if np.ndim(v)), default=1)
    for start in range(0, n, size):
        yield {k: v[start:start + size] if np.ndim(v) else v for k, v in feeds.items()}


def fixed_batch(inputs: list[onnx.ValueInfoProto]) -> int | None:
    """The batch size that the model's inputs fix on axis 0, or None when it is open (or the inputs disagree).

    The batch axis is axis 0 of the inputs of rank >= 2 (of rank 1 when there are none): rank-0 and rank-1
    side inputs (lengths, thresholds) carry no batch. A model that names another axis the batch ("batch", "N":
    a sequence-first [seq, batch, features] layout) has no fixed batch on axis 0. `graph_inputs(model)` gives
    the inputs:

        >>> fixed_batch(graph_inputs(model))   # input "x": float[1, 128]
        1
    """
    ranked = [v.type.tensor_type.shape.dim for v in inputs if v.type.tensor_type.HasField("shape")]
    batched = [dims for dims in ranked if len(dims) >= 2] or [dims for dims in ranked if len(dims) == 1]
    sizes = set()
    for dims in batched:
        if not (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            return None
        if any(_names_batch(d.dim_param) for d in list(dims)[1:]):
            return None
        sizes.add(dims[0].dim_value)
    return sizes.pop() if len(sizes) == 1 else None


def _names_batch(dim_param: str) -> bool:
    name = dim_param.lower()
    return name == "n" or "batch" in name


def feed_in_chunks(run, feeds: dict[str, np.ndarray], batch: int | None) -> dict[str, np.ndarray]:
    """`run(feeds)`, fed in chunks of `batch` samples when the model fixes its batch and the feeds hold another count.

    A model exported with a fixed batch (say 1) accepts exactly that many samples per call; calibration and
    evaluation data usually hold more. The sample count is the longest axis 0 among the feeds; arrays with that
    many rows are sliced along it (a short last chunk is padded by repeating its last sample, and the padding's
    outputs dropped); other arrays (thresholds, lengths) go whole to every call. Outputs are concatenated
    along axis 0. `batch=None` (open batch axis) calls `run` once.

        >>> outputs = feed_in_chunks(session.run, {"x": np.zeros((32, 128), np.float32)}, batch=1)
        >>> outputs["y"].shape      # 32 calls of one sample each
        (32, 10)

    Raises RuntimeFailure when an output has no batch axis to concatenate along.
    """
    count = max((len(v) for v in feeds.values() if np.ndim(v)), default=0)
    if batch is None or count in (0, batch):
        return run(feeds)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, count, batch):
        chunk = {k: _pad_chunk(v[start:start + batch], batch) if np.ndim(v) and len(v) == count else v
                 for k, v in feeds.items()}
        for name, value in run(chunk).items():
            if np.ndim(value) == 0 or len(value) != batch:
                raise RuntimeFailure(
                    f"output {name!r} has shape {list(np.shape(value))}, not batch-first: cannot feed {count} samples "
                    f"to a model with a fixed batch of {batch}; give exactly {batch} samples"
                )
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(values)[:count] for name, values in parts.items()}


def _pad_chunk(array: np.ndarray, batch: int) -> np.ndarray:
    if len(array) == batch:
        return array
    return np.concatenate([array, np.repeat(array[-1:], batch - len(array), axis=0)])
