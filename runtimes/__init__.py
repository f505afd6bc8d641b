"""Runtimes that execute ONNX models: ort (reference), tvm (scheduled dense + block-sparse kernels), reram (emulator).

Each runtime is a module (or package) here exposing `load(model, **options) -> Session`. They are imported
only when asked for, so `import runtimes` stays light and a missing optional dependency surfaces as a clear
install hint rather than an ImportError.
"""

from __future__ import annotations

import importlib

import onnx

from optimizer.errors import UsageError
from runtimes.base import Session

RUNTIMES = ("ort", "tvm", "reram")


def load(name: str, model: onnx.ModelProto, **options) -> Session:
    """`runtimes.<name>.load` on the normalised model (optimizer.normalize: IR < 4 weights, Constant-node weights,
    constant subgraphs folded), so every runtime sees the form the passes and the report see.

        >>> session = load("tvm", model, threads=1)
        >>> session.run({"x": x})["y"]
    """
    if name not in RUNTIMES:
        raise UsageError(f"unknown runtime {name!r}; available runtimes: {', '.join(RUNTIMES)}")
    from optimizer.normalize import normalize

    module = importlib.import_module(f"runtimes.{name}")
    return module.load(normalize(model)[0], **options)  # the pipeline's load-time normalisation, for every runtime
