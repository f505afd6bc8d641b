"""ONNX Runtime on the CPU: the reference for outputs and for speed."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort

from optimizer.errors import RuntimeFailure, UsageError

# ORT's own log lines (coloured, on stderr) would interleave with ours; its errors still reach us as exceptions.
ort.set_default_logger_severity(3)
# "[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/.../x.h:46 void ns::Fn(args...) message" -> "FAIL: message"
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*(\w+)\s*:\s*")
_CPP_LOCATION = re.compile(r"/?\S+\.(?:h|cc|cpp):\d+\s+.*?\)\s+(?:const\s+)?(?=\S)")


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

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outputs = self._session.run(self.output_names, feeds)
        except Exception as e:
            raise RuntimeFailure(f"onnxruntime failed to run the model: {_first_line(e)}") from e
        return dict(zip(self.output_names, outputs, strict=True))

    def describe(self) -> dict:
        return {"provider": "CPUExecutionProvider", "version": ort.__version__, "threads": self.threads}


def _first_line(error: Exception, limit: int = 300) -> str:
    """ORT's message without its C++ source location and function signature, on one line."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    match = _ORT_PREFIX.match(line)
    if match:
        line = f"{match.group(1)}: " + _CPP_LOCATION.sub("", line[match.end():], count=1)
    return line if len(line) <= limit else line[:limit] + "…"


def load(model: onnx.ModelProto, threads: int | None = None, **options) -> OrtSession:
    if options:
        raise UsageError(f"runtime ort: unknown option {next(iter(options))!r}; options are: threads")
    return OrtSession(model, threads=threads)
