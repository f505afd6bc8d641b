"""Intermediate tensors of a model on calibration data, captured with ONNX Runtime (extra graph outputs).

Nothing here re-implements an op: the tensors asked for become graph outputs of a copy of the model, one
session runs it over the calibration set in chunks the model accepts, and each chunk's tensors are handed to
the caller, who reduces them (sums, Gram matrices) before the next chunk comes, so memory stays bounded by
one chunk's activations.

    >>> for chunk in stream(model, feeds, ["conv1_out"]):      # doctest: +SKIP
    ...     total += chunk["conv1_out"].sum(axis=(0, 2, 3))
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from optimizer.data import fixed_batch, graph_inputs
from optimizer.ort_session import ort_session, run_outputs

CHUNK = 16  # samples per run when the batch dimension is open


def calibration_chunks(model: onnx.ModelProto, feeds: dict[str, np.ndarray], size: int = CHUNK
                       ) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """(chunk, real sample count) along axis 0, in chunks the model accepts: its fixed batch when it has one (a
    short last chunk padded by repeating its last sample, as `optimizer.data.feed_in_chunks` does; the caller
    keeps only the first `count` rows of the outputs), else `size` samples at a time."""
    count = len(next(iter(feeds.values())))
    fixed = fixed_batch(graph_inputs(model))
    step = fixed or size
    for start in range(0, count, step):
        chunk = {k: v[start:start + step] for k, v in feeds.items()}
        real = len(next(iter(chunk.values())))
        if fixed and real < fixed:
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], fixed - real, axis=0)]) for k, v in chunk.items()}
        yield chunk, real


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of the model whose graph outputs are `names` (intermediate or graph outputs) and nothing else."""
    from passes.graph.ir import inferred_value_info

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    types = {v.name: v for v in [*copy.graph.value_info, *copy.graph.output, *copy.graph.input]}
    missing = [n for n in names if n not in types]
    if missing:
        types.update({v.name: v for v in inferred_value_info(copy)})
    del copy.graph.output[:]
    for name in names:
        value = types.get(name)
        if value is not None:
            copy.graph.output.append(value)
        else:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy


def stream(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str], size: int = CHUNK
           ) -> Iterator[dict[str, np.ndarray]]:
    """Run the model over `feeds` chunk by chunk; yield {name: that chunk's tensor} for every name asked."""
    names = list(dict.fromkeys(names))
    session = ort_session(with_outputs(model, names), what="the activation-capture model", basic_optimizations=True)
    for chunk, real in calibration_chunks(model, feeds, size):
        yield {name: value[:real] for name, value in run_outputs(session, chunk, names).items()}


def collect(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str] | None = None,
            size: int = CHUNK) -> dict[str, np.ndarray]:
    """`stream` gathered whole: {name: the tensor over all of `feeds`}; names default to the graph outputs."""
    names = list(dict.fromkeys(names if names is not None else [o.name for o in model.graph.output]))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for chunk in stream(model, feeds, names, size):
        for name in names:
            parts[name].append(chunk[name])
    return {name: np.concatenate(values) for name, values in parts.items()}


def sample_shapes(feeds: dict[str, np.ndarray] | None) -> dict[str, list[int]] | None:
    """{input: the shape of one sample (batch 1)} of calibration feeds, for counting MACs at the data's sizes
    where the model's dims are dynamic; None without feeds.

        >>> sample_shapes({"x": np.zeros((64, 3, 224, 224))})
        {'x': [1, 3, 224, 224]}
    """
    return {name: [1, *np.shape(value)[1:]] for name, value in (feeds or {}).items()} or None
