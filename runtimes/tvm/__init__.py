"""The `tvm` runtime: ONNX -> Relax, Sculpt's scheduled dense and block-sparse kernels, compiled for the host CPU.

`load(model, threads=..., batch=..., sparse=auto|always|never, block=RxC, cache=..., cache_dir=..., tuned=...)`.
TVM is imported only when a model is loaded, so `import runtimes` works without it.
"""

from __future__ import annotations

import importlib.util

import onnx

from optimizer.errors import MissingDependency


def load(model: onnx.ModelProto, **options):
    if importlib.util.find_spec("tvm") is None:
        raise MissingDependency("apache-tvm", "tvm")
    from runtimes.tvm.options import parse_options
    from runtimes.tvm.partition import PartitionedSession, unsupported_nodes
    from runtimes.tvm.session import TvmSession

    parsed = parse_options(options)  # the model comes normalised from runtimes.load
    unsupported = unsupported_nodes(model)
    if unsupported:  # LSTM, GRU, If...: those parts run on ONNX Runtime
        return PartitionedSession(model, parsed, unsupported)
    return TvmSession(model, parsed)
