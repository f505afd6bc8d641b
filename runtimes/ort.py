"""ONNX Runtime on the CPU: the reference for outputs and for speed."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from optimizer.data import feed_in_chunks, fixed_batch, graph_inputs
from optimizer.errors import UsageError
from optimizer.ort_session import ort_session, run_outputs


class OrtSession:
    def __init__(self, model: onnx.ModelProto, threads: int | None = None):
        self.threads = threads
        self._session = ort_session(model, threads)
        self.output_names = [o.name for o in self._session.get_outputs()]
        self.batch = fixed_batch(graph_inputs(model))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name; more samples than a fixed batch are fed in chunks (optimizer.data.feed_in_chunks)."""
        return feed_in_chunks(self._run_once, feeds, self.batch)

    def _run_once(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_outputs(self._session, feeds, self.output_names)

    def describe(self) -> dict:
        return {"provider": "CPUExecutionProvider", "version": ort.__version__, "threads": self.threads}


def load(model: onnx.ModelProto, threads: int | None = None, **options) -> OrtSession:
    if options:
        raise UsageError(f"runtime ort: unknown option {next(iter(options))!r}; options are: threads")
    return OrtSession(model, threads=threads)
