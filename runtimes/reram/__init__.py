"""reram: an emulator of a ReRAM crossbar accelerator (specification: shared/reference/reram-model.md).

Conv / Gemm / MatMul with constant weights run on emulated crossbars (bit-serial inputs, bit-sliced weights,
per-column ADCs, shift-and-add); every other op runs digitally. `load(model, **options)` takes the options of
runtimes.reram.config.ReramOptions as typed values or strings, plus `config=FILE.yaml`.
"""

from __future__ import annotations

import onnx

from runtimes.reram.config import ReramOptions, load_config_file, parse_options
from runtimes.reram.session import ReramSession

__all__ = ["ReramOptions", "ReramSession", "load", "load_config_file", "parse_options"]


def load(model: onnx.ModelProto, **options) -> ReramSession:
    return ReramSession(model, parse_options(options))
