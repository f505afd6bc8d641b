"""Overridable initializers: a graph input that also has a same-name initializer (legal since IR version 4).

The initializer is the input's default; a caller may feed another value, so no pass may treat it as a constant
(folding it would bake the default in and drop the input). The pipeline hands every pass the model with those
initializers detached (the input stays a graph input, with no constant behind it) and puts them back afterwards
for every input the pass kept. `freeze` makes them ordinary constants instead, when the user asks for it.

    >>> model, defaults = detach(model)      # input "scale" keeps its place; its default is set aside
    >>> model = reattach(new_model, defaults)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

FIRST_IR_WITH_OVERRIDABLE = 4  # before IR 4 every initializer had to be listed as a graph input


def overridable_names(model: onnx.ModelProto) -> list[str]:
    """Graph inputs that have a same-name initializer, in input order ([] below IR version 4)."""
    if model.ir_version < FIRST_IR_WITH_OVERRIDABLE:
        return []
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name in initializers]


def detach(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """A copy without the overridable initializers, and those initializers by name (the input itself stays)."""
    names = set(overridable_names(model))
    if not names:
        return model, {}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    defaults = {t.name: t for t in model.graph.initializer if t.name in names}
    kept = [t for t in copy.graph.initializer if t.name not in names]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    return copy, defaults


def reattach(model: onnx.ModelProto, defaults: dict[str, onnx.TensorProto]) -> onnx.ModelProto:
    """Put the defaults back for every graph input the model still has (a pass may have removed an unused one)."""
    if not defaults:
        return model
    present = {i.name for i in model.graph.input}
    existing = {t.name for t in model.graph.initializer}
    model.graph.initializer.extend(t for name, t in defaults.items() if name in present and name not in existing)
    return model


def default_feeds(defaults: dict[str, onnx.TensorProto]) -> dict[str, np.ndarray]:
    """The defaults as arrays, for a pass that runs the detached model on calibration data."""
    return {name: numpy_helper.to_array(t) for name, t in defaults.items()}


def freeze(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose overridable inputs are plain constants (removed from the graph inputs, initializer kept)."""
    names = set(overridable_names(model))
    if not names:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    inputs = [i for i in copy.graph.input if i.name not in names]
    del copy.graph.input[:]
    copy.graph.input.extend(inputs)
    return copy
