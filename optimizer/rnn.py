"""Facts about ONNX's recurrent layers (LSTM, GRU, RNN) that the report, the channel analysis and the runtimes share.

Every recurrent op takes X, W [directions, gates*H, input_size], R [directions, gates*H, H] and an optional
B [directions, 2*gates*H]; gates is 4 for LSTM (i, o, f, c), 3 for GRU (z, r, h), 1 for RNN.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx

RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def layout(node: onnx.NodeProto) -> int:
    """0: X is [seq, batch, input] (the default); 1: [batch, seq, input]."""
    return next((a.i for a in node.attribute if a.name == "layout"), 0)


def recurrent_macs(node: onnx.NodeProto, x_shape: Sequence[int], w_shape: Sequence[int]) -> int:
    """MACs of one call: every direction, time step and sample multiplies its input by W and its state by R.

        >>> recurrent_macs(lstm, x_shape=[50, 1, 64], w_shape=[1, 512, 64])   # LSTM H=128, 50 steps
        4_915_200            # 50 * 1 * 512 * (64 + 128)
    """
    steps, samples = (x_shape[0], x_shape[1]) if layout(node) == 0 else (x_shape[1], x_shape[0])
    directions, gate_rows, input_size = w_shape
    hidden = gate_rows // RECURRENT_GATES[node.op_type]
    return int(steps * samples * directions * gate_rows * (input_size + hidden))
