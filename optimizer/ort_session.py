"""The one place an onnxruntime InferenceSession is built (CPU provider, quiet logs, fixed threads when asked).

    session = ort_session(model, threads=1, what="the verification model")
    outputs = session.run(None, feeds)
"""

from __future__ import annotations

import onnx

from optimizer.errors import RuntimeFailure, first_line


def ort_session(model: onnx.ModelProto, threads: int | None = None, *, what: str = "the model",
                basic_optimizations: bool = False):
    """An onnxruntime CPU session for `model`; `threads` fixes the intra-op pool (one inter-op thread);
    `basic_optimizations` stops ORT at its basic graph rewrites (no fusions), for runs that read intermediate
    tensors and want them as the graph computes them.

    Raises RuntimeFailure naming `what` and onnxruntime's first message line when the model cannot be loaded."""
    import onnxruntime as ort

    # fatal only: ORT's own log lines go straight to file descriptor 2 (coloured) and would interleave with ours;
    # its errors still reach us as exceptions. The default logger covers sessions others open (graphsurgeon).
    ort.set_default_logger_severity(4)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if basic_optimizations:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime has no common base exception type
        raise RuntimeFailure(f"onnxruntime cannot load {what}: {first_line(e)}") from e


def run_outputs(session, feeds: dict, names: list[str] | None = None) -> dict:
    """Run a session: output name -> array (all outputs, in order, unless `names` picks some); RuntimeFailure with
    onnxruntime's first message line when the run fails (a missing input, a wrong shape)."""
    names = names if names is not None else [o.name for o in session.get_outputs()]
    try:
        outputs = session.run(names, feeds)
    except Exception as e:  # onnxruntime has no common base exception type
        raise RuntimeFailure(f"onnxruntime failed to run the model: {first_line(e)}") from e
    return dict(zip(names, outputs, strict=True))
