"""ONNX Runtime on the CPU: the reference for outputs and for speed."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from optimizer.data import feed_in_chunks, fixed_batch, graph_inputs
from optimizer.errors import RuntimeFailure, UsageError


class OrtSession:
    def __init__(self, model: onnx.ModelProto, threads: int | None = None):
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.threads = threads
        try:
            self._session = ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own exception types for every load failure
            raise RuntimeFailure(f"onnxruntime cannot load the model: {_first_line(e)}") from e
        self.output_names = [o.name for o in self._session.get_outputs()]
        self.batch = fixed_batch(graph_inputs(model))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name; more samples than a fixed batch are fed in chunks (optimizer.data.feed_in_chunks)."""
        return feed_in_chunks(self._run_once, feeds, self.batch)

    def _run_once(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outputs = self._session.run(self.output_names, feeds)
        except Exception as e:
            raise RuntimeFailure(f"onnxruntime failed to run the model: {_first_line(e)}") from e
        return dict(zip(self.output_names, outputs, strict=True))

    def describe(self) -> dict:
        return {"provider": "CPUExecutionProvider", "version": ort.__version__, "threads": self.threads}


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load(model: onnx.ModelProto, threads: int | None = None, **options) -> OrtSession:
    if options:
        raise UsageError(f"runtime ort: unknown option {next(iter(options))!r}; options are: threads")
    return OrtSession(model, threads=threads)
