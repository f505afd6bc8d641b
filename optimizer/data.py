"""Calibration and evaluation data: .npz files holding one array per model input, plus optional "labels"."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import onnx

from optimizer.errors import DataError, RuntimeFailure, UsageError, first_line

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
        known = tensor.elem_type in onnx.TensorProto.DataType.values()
        type_name = onnx.TensorProto.DataType.Name(tensor.elem_type) if known else f"code {tensor.elem_type}"
        raise UsageError(f"input {value.name!r}: element type {type_name} "
                         "is not supported for generated data; pass real inputs with --input/--calibration")
    shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else batch for d in tensor.shape.dim)
    return shape, np.dtype(_ONNX_TO_NUMPY[tensor.elem_type])


def random_inputs(model: onnx.ModelProto, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs valid for each input's dtype: N(0,1) floats, small non-negative integers (token ids), booleans."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in graph_inputs(model):
        shape, dtype = input_spec(value, batch)
        feeds[value.name] = _random_array(rng, shape, dtype)
    return feeds


def _random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    return rng.integers(0, min(np.iinfo(dtype).max, 100), size=shape).astype(dtype)


def random_samples(model: onnx.ModelProto, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`random_inputs` with at least `count` samples, also for a model exported with a fixed batch of 1 whose
    outputs all declare a batch of 1 on axis 0: its batched inputs get `count` rows (sessions feed them one at a
    time, `feed_in_chunks`). Other fixed shapes (a sequence-first [5, 2, 8]) are left as they are.

        >>> random_samples(model, 32)["x"].shape      # model input x: float[1, 8], output y: float[1, 10]
        (32, 8)
    """
    inputs = graph_inputs(model)
    batch = fixed_batch(inputs)
    feeds = random_inputs(model, count, seed)
    outputs_batch_first = all(
        len(o.type.tensor_type.shape.dim) >= 1 and o.type.tensor_type.shape.dim[0].dim_value == 1
        for o in model.graph.output)
    if batch != 1 or not outputs_batch_first:
        return feeds
    rng = np.random.default_rng([seed, count])
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        if len(dims) >= 1 and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            shape = feeds[value.name].shape
            feeds[value.name] = _random_array(rng, (count, *shape[1:]), feeds[value.name].dtype)
    return feeds


def load_npz(path: str | os.PathLike, model: onnx.ModelProto | None = None) -> dict[str, np.ndarray]:
    """Read an .npz and check its values (`check_values`); with a model, also check that it holds every input with
    a compatible rank, dtype and fixed dims (`check_feeds`). Raises DataError (exit 2) naming file, array and fix.

        >>> data = load_npz("calibration.npz", model)     # {"input": float32[256, 1, 8, 8]}
    """
    data = read_npz(path)
    check_values(data, str(path))
    if model is not None:
        check_feeds(data, model, str(path))
    return data


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK"


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, or DataError: missing, empty (0 bytes), a .npy file, not a zip, pickled objects."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not an .npz file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not head:
        raise DataError(f"{path}: is empty (0 bytes); write it with np.savez(path, input_name=array, ...)")
    if head.startswith(_NPY_MAGIC):
        raise DataError(f"{path}: is a .npy file (one unnamed array), not an .npz; save it with "
                        "np.savez(path, <input name>=array) so each array is named after a model input")
    if not head.startswith(_ZIP_MAGIC):
        raise DataError(f"{path}: not an .npz file (no zip header); write it with np.savez(path, input_name=array)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DataError(f"{path}: holds pickled Python objects; store plain numeric arrays") from None
        raise DataError(f"{path}: not a readable .npz file ({first_line(e, 200)})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, KeyError) as e:
        raise DataError(f"{path}: not a readable .npz file (truncated or corrupt: {first_line(e, 200)})") from None


def check_values(data: dict[str, np.ndarray], where: str) -> None:
    """Refuse data that would make a verification or accuracy figure meaningless: no arrays, an empty array,
    non-numeric dtypes, NaN or Inf, and labels that are not one class index per sample.

        >>> check_values({"x": np.array([[0.0, np.nan]], np.float32)}, "cal.npz")
        DataError: cal.npz: array 'x' has 1 NaN value (first at index (0, 1)); remove or fix those samples
    """
    if not data:
        raise DataError(f"{where}: holds no arrays; it needs one array per model input")
    for name, array in data.items():
        if array.dtype.kind not in "biuf":
            raise DataError(f"{where}: array {name!r} has dtype {array.dtype}; store numbers (float, int or bool)")
        if array.size == 0:
            raise DataError(f"{where}: array {name!r} is empty (shape {list(array.shape)}); give at least one sample")
        if array.dtype.kind == "f":
            _check_finite(array, name, where)
    if LABELS in data:
        _check_labels(data[LABELS], where)


def _check_finite(array: np.ndarray, name: str, where: str) -> None:
    finite = np.isfinite(array)
    if finite.all():
        return
    nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
    first = tuple(int(i) for i in np.argwhere(~finite)[0])
    counts = " and ".join(f"{n} {kind} value{'s' if n > 1 else ''}" for n, kind in ((nan, "NaN"), (inf, "Inf")) if n)
    raise DataError(f"{where}: array {name!r} has {counts} (first at index {first}); remove or fix those samples")


def _check_labels(labels: np.ndarray, where: str) -> None:
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(f"{where}: 'labels' has shape {list(labels.shape)} (one-hot?); give one class index per "
                        "sample, shape [N] (e.g. labels.argmax(1))")
    if labels.ndim not in (1, 2) or (labels.ndim == 2 and labels.shape[1] != 1):
        raise DataError(f"{where}: 'labels' has shape {list(labels.shape)}; give one class index per sample, shape [N]")
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise DataError(f"{where}: 'labels' holds non-integer values; give class indices (integers)")
    if labels.min() < 0:
        raise DataError(f"{where}: 'labels' holds negative values ({labels.min()}); give class indices >= 0")


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
