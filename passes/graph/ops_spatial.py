"""Ops over the non-channel axes: pooling, Pad, Resize/Upsample, reductions, and the ops that read shapes."""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from passes.graph.channels import ChannelState, Space
from passes.graph.handler import Cut, Handler, attr, axes_operand, normalize_axis


def _zero_only(values: np.ndarray) -> np.ndarray:
    return np.where(values == 0, 0.0, np.nan)


class PoolHandler(Handler):
    """Pooling over spatial axes (channels on axis 1). A constant channel stays that constant, except where an
    average counts zero padding or an Lp norm rescales it."""

    op_types = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        space = state.space(node.inputs[0])
        if space is None:
            return
        if space.axis != 1:
            state.block_node(node, f"pools over axis {space.axis}, which carries the channels")
            return
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            state.block_node(node, "its argmax indices output is used")
            return
        values = space.values
        if node.op in ("LpPool", "GlobalLpPool"):
            values = _zero_only(values)
        elif (
            node.op == "AveragePool"
            and attr(node, "count_include_pad", 0)
            and (
                any(attr(node, "pads", []))
                or attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "VALID", b"VALID")
            )
        ):
            values = _zero_only(values)
        state.set_space(node, node.outputs[0], space.with_values(values))


class PadHandler(Handler):
    """Pad on spatial axes only. With mode=constant a channel stays constant only if it equals the pad value."""

    op_types = ("Pad",)

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        view = state.view
        space = state.space(node.inputs[0])
        if space is None:
            return
        rank = view.rank(node.inputs[0])
        pads = node.attrs.get("pads") if view.opset < 11 else view.input_constant(node, 1)
        axes = axes_operand(state, node, 3) if view.opset >= 18 else []
        if pads is None or axes is None or rank is None:
            state.block_node(node, "its pads are not constant", [0])
            return
        axes = [normalize_axis(a, rank) for a in axes] or list(range(rank))
        pads = np.asarray(pads).reshape(2, len(axes))
        if space.axis in axes and np.any(pads[:, axes.index(space.axis)] != 0):
            state.block_node(node, "pads the channel axis", [0])
            return
        mode = attr(node, "mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        values = space.values
        if mode == "constant":
            fill = attr(node, "value", 0.0) if view.opset < 11 else view.input_constant(node, 2)
            fill = 0.0 if fill is None and not view.has_input(node, 2) else fill
            values = np.where(values == fill, values, np.nan) if fill is not None else np.full(len(space), np.nan)
        state.set_space(node, node.outputs[0], space.with_values(values))


class ResizeHandler(Handler):
    """Resize / Upsample with scale 1 (or size unchanged) on the channel axis; a `sizes` entry follows pruning."""

    op_types = ("Resize", "Upsample")

    def _operands(self, node: gs.Node, state: ChannelState) -> tuple[int, np.ndarray | None]:
        """(input index, constant) of the scales or sizes that apply, the latter preferred when given."""
        if node.op == "Resize" and state.view.opset >= 11:
            if state.view.has_input(node, 3):
                return 3, state.view.input_constant(node, 3)
            return 2, state.view.input_constant(node, 2)
        if node.op == "Upsample" and "scales" in node.attrs:
            return -1, np.asarray(node.attrs["scales"])
        return 1, state.view.input_constant(node, 1)

    def _channel_entry(self, node: gs.Node, state: ChannelState, space: Space) -> int | None:
        axes = [normalize_axis(a, state.view.rank(node.inputs[0])) for a in attr(node, "axes", [])]
        if not axes:
            return space.axis
        return axes.index(space.axis) if space.axis in axes else None

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        space = state.space(node.inputs[0])
        if space is None:
            return
        index, operand = self._operands(node, state)
        if operand is None or state.view.rank(node.inputs[0]) is None:
            state.block_node(node, "its scales or sizes are not constant", [0])
            return
        entry = self._channel_entry(node, state, space)
        expected = len(space) if index == 3 else 1
        if entry is not None and operand[entry] != expected:
            state.block_node(node, "resizes the channel axis", [0])
            return
        state.set_space(node, node.outputs[0], space)

    def prune(self, node: gs.Node, state: ChannelState, cut: Cut) -> None:
        space, keep = state.space(node.inputs[0]), cut.keep(node.inputs[0])
        if space is None or keep is None:
            return
        index, operand = self._operands(node, state)
        entry = self._channel_entry(node, state, space)
        if index == 3 and entry is not None:
            sizes = operand.copy()
            sizes[entry] = int(keep.sum())
            state.view.replace_constant(node, 3, sizes)


_REDUCED_CONSTANT = {
    "ReduceMean": lambda v, n: v,
    "ReduceMax": lambda v, n: v,
    "ReduceMin": lambda v, n: v,
    "ReduceSum": lambda v, n: v * n,
    "ReduceL1": lambda v, n: np.abs(v) * n,
    "ReduceL2": lambda v, n: np.abs(v) * np.sqrt(n),
    "ReduceSumSquare": lambda v, n: v * v * n,
    "ReduceProd": lambda v, n: v**n,
    "ReduceLogSumExp": lambda v, n: v + np.log(n),
    "ReduceLogSum": lambda v, n: np.log(v * n),
}
_ZERO_PRESERVING = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare")


class ReduceHandler(Handler):
    """Reductions over non-channel axes (statistics pooling: mean and std over time). Reducing the channel
    axis itself would mix channels and is declined."""

    op_types = tuple(_REDUCED_CONSTANT)

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        space = state.space(node.inputs[0])
        if space is None:
            return
        shape = state.view.shape(node.inputs[0])
        axes = axes_operand(state, node, 1)
        if axes is None or shape is None:
            state.block_node(node, "its axes or input shape are unknown", [0])
            return
        if not axes and attr(node, "noop_with_empty_axes", 0):
            state.set_space(node, node.outputs[0], space)
            return
        axes = [normalize_axis(a, len(shape)) for a in axes] or list(range(len(shape)))
        if space.axis in axes:
            state.block_node(node, "reduces over the channel axis", [0])
            return
        count = math.prod(shape[a] for a in axes) if all(isinstance(shape[a], int) for a in axes) else None
        with np.errstate(all="ignore"):
            if count:
                values = _REDUCED_CONSTANT[node.op](space.values, count)
            elif node.op in _ZERO_PRESERVING:
                values = _zero_only(space.values)
            else:
                values = np.full(len(space), np.nan)
        new_axis = space.axis if attr(node, "keepdims", 1) else space.axis - sum(a < space.axis for a in axes)
        state.set_space(node, node.outputs[0], Space(new_axis, space.ids, np.asarray(values, dtype=np.float64)))


class ShapeHandler(Handler):
    """Shape: harmless unless the channel count it reads is used (then pruning would change a computed value)."""

    op_types = ("Shape",)

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        space = state.space(node.inputs[0])
        rank = state.view.rank(node.inputs[0])
        if space is None:
            return
        if rank is None:
            state.block_node(node, "reads the shape of a tensor of unknown rank")
            return
        start = normalize_axis(attr(node, "start", 0), rank)
        end = normalize_axis(attr(node, "end", rank), rank)
        if not start <= space.axis < end:
            return
        index = space.axis - start
        if not all(self._ignores(consumer, state, index, end - start) for consumer in node.outputs[0].outputs):
            state.block_node(node, "the channel count it reads is used at run time")

    @staticmethod
    def _ignores(consumer: gs.Node, state: ChannelState, index: int, length: int) -> bool:
        """True when `consumer` only picks entries of the shape other than `index` (a Gather of other indices,
        a Slice of a range without it: a flatten's `Shape -> Slice [0:1] -> Concat [-1]` reads the batch only),
        looking through a Cast."""
        view = state.view
        if consumer.op == "Cast":
            return all(ShapeHandler._ignores(c, state, index, length) for c in consumer.outputs[0].outputs)
        if consumer.op == "Gather" and attr(consumer, "axis", 0) == 0:
            picked = view.constant(consumer.inputs[1])
            return picked is not None and not np.any(np.where(picked < 0, picked + length, picked) == index)
        if consumer.op == "Slice" and len(consumer.inputs) >= 3:
            bounds = [view.constant(t) for t in consumer.inputs[1:]]
            if any(b is None for b in bounds) or any(np.size(b) != 1 for b in bounds):
                return False
            start, end = (int(np.ravel(b)[0]) for b in bounds[:2])
            axis = int(np.ravel(bounds[2])[0]) if len(bounds) > 2 else 0
            step = int(np.ravel(bounds[3])[0]) if len(bounds) > 3 else 1
            if axis not in (0, -1) or step != 1:
                return False
            start, end = (max(0, min(length, v + length if v < 0 else v)) for v in (start, end))
            return not start <= index < end
        return False


class SizeHandler(Handler):
    op_types = ("Size",)

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        state.block_node(node, "the element count it reads changes when channels are removed")
