"""Declines are data: the one type every handler, pass step and runtime mapper returns when it cannot act.

A decline names the node (or tensor), its op, a stable `code` that code may branch on, and `why` for the reader.
It always ends up in a report (`as_report()`); nothing is skipped silently, and no logic reads `why`.

    d = Decline("conv1", "Conv", "float-weight", "float weight 'w' (not quantized)")
    str(d)         # "Conv conv1: float weight 'w' (not quantized)"
    d.as_report()  # {"node": "conv1", "op": "Conv", "code": "float-weight", "reason": "float weight ..."}
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decline:
    """Why a node was left alone: node (or tensor) name, op type, a stable kebab-case code, and a sentence."""

    node: str
    op: str
    code: str
    why: str

    def __str__(self) -> str:
        return f"{self.op} {self.node}: {self.why}"

    def as_report(self) -> dict:
        """The report entry (the key stays `reason`, as reports have always called it)."""
        return {"node": self.node, "op": self.op, "code": self.code, "reason": self.why}
