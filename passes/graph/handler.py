"""The interface every op handler implements, and what a handler is told when it is time to prune.

A handler knows one op kind: how channels flow through it (`propagate`: spaces in, spaces out, ties, blocks,
weights) and how it slices its own parameters once units are removed (`prune`); an op with two ways of carrying
channels also says, after a sweep, whether its node needs the other one (`reconsider`). The table of handlers is
in `handlers.py`.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import numpy as np
import onnx_graphsurgeon as gs

from passes.graph.channels import ChannelState


class Cut(Protocol):
    """What pruning removes, as a handler sees it."""

    def keep(self, tensor: gs.Tensor) -> np.ndarray | None:
        """Boolean mask over the positions of the tensor's space; None when nothing is removed there."""

    def removed_constants(self, tensor: gs.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(positions, values) of removed positions that carry a non-zero constant (to fold into a bias)."""

    def note(self, node: gs.Node, text: str) -> None:
        """Record something the report should say about this node (an approximate fold, a dropped constant)."""


class Handler:
    """Base class: set `op_types` (and `since_version` for an opset-specific variant), implement `propagate`."""

    op_types: ClassVar[tuple[str, ...]] = ()
    since_version: ClassVar[int] = 1

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        raise NotImplementedError

    def prune(self, node: gs.Node, state: ChannelState, cut: Cut) -> None:
        """Slice the node's own parameters. The default suits ops that own none."""

    def reconsider(self, node: gs.Node, state: ChannelState) -> bool:
        """After a whole sweep: True when the node should be analysed again in its alternate layout (the next
        sweep then has `state.in_alternate(node)`), because the first one left it nothing to prune. The
        default suits ops with a single layout."""
        return False


def attr(node: gs.Node, name: str, default):
    return node.attrs.get(name, default)


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def aligned_axis(out_axis: int, out_rank: int, in_rank: int) -> int:
    """The input axis that numpy-style broadcasting lines up with `out_axis` (negative: the input lacks it)."""
    return out_axis - (out_rank - in_rank)


def zero_slices(weight: np.ndarray, axis: int) -> np.ndarray:
    """True for each index along `axis` whose slice of `weight` is entirely zero."""
    moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    return ~np.any(moved != 0, axis=1)


def axes_operand(state: ChannelState, node: gs.Node, input_index: int, attr_name: str = "axes") -> list[int] | None:
    """The `axes` of an op, whether given as an attribute (older opsets) or as a constant input (newer ones).

    Returns None when they are given but not constant; [] when they are absent.
    """
    if attr_name in node.attrs:
        return [int(a) for a in node.attrs[attr_name]]
    if state.view.has_input(node, input_index):
        value = state.view.input_constant(node, input_index)
        return None if value is None else [int(a) for a in np.ravel(value)]
    return []
