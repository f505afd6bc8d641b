"""What a kernel does to each accumulated output element before storing it: bias, residual add, ReLU.

Fusing these into the store of a GEMM/BSR tile saves one pass over the output per op, which for a conv layer
of a small CNN costs as much as a few percent of the layer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Epilogue:
    """y[m, n] = relu?(acc[m, n] + bias[n] + residual[m, n]), each term optional."""

    bias: bool = False
    residual: bool = False
    relu: bool = False

    def apply(self, value, m, n, bias, residual):
        """`value` and indices are TIR expressions; works inside TE computes and TVMScript alike."""
        from tvm import tirx

        if self.bias:
            value = value + bias[n]
        if self.residual:
            value = value + residual[m, n]
        if self.relu:
            value = tirx.Max(value, tirx.const(0.0, "float32"))
        return value

    def describe(self) -> str:
        parts = [name for name, on in (("bias", self.bias), ("residual", self.residual), ("relu", self.relu)) if on]
        return "+".join(parts) or "none"
