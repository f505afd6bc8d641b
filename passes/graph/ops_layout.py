"""Ops that move, cut, join or reshape channel axes: Concat, Split, Slice, Gather, Transpose, Reshape, Flatten,
Squeeze, Unsqueeze, Expand, Tile."""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.declines import Decline
from passes.graph.channels import ChannelState, Space
from passes.graph.handler import Cut, Handler, attr, axes_operand, normalize_axis, zero_slices
from passes.graph.regroup import regroup, resolve_target


class ConcatHandler(Handler):
    """Concat on the channel axis lays the input spaces end to end (inputs without channels add OPAQUE
    positions); Concat on another axis ties the inputs' channels position by position."""

    op_types = ("Concat",)

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        view = state.view
        tracked = {i: s for i, t in enumerate(node.inputs) if (s := state.space(t)) is not None}
        if not tracked:
            return
        rank = view.rank(node.outputs[0]) or view.rank(node.inputs[next(iter(tracked))])
        axis = normalize_axis(attr(node, "axis", 0), rank)
        on_axis = [s.axis == axis for s in tracked.values()]
        if all(on_axis):
            self._along(node, state, tracked, axis)
        elif not any(on_axis):
            self._across(node, state, tracked)
        else:
            state.block_node(node, "some inputs carry channels on the concatenation axis and others on another axis")

    def _along(self, node: gs.Node, state: ChannelState, tracked: dict[int, Space], axis: int) -> None:
        parts = []
        for i, tensor in enumerate(node.inputs):
            if i in tracked:
                parts.append(tracked[i])
                continue
            shape = state.view.shape(tensor)
            size = shape[axis] if shape is not None and len(shape) > axis else None
            if not isinstance(size, int):
                state.block_node(node, f"concatenates the channels with {tensor.name}, whose size is unknown")
                return
            parts.append(Space.opaque(axis, size))
        ids = np.concatenate([p.ids for p in parts])
        values = np.concatenate([p.values for p in parts])
        for i in tracked:
            state.member(node, node.inputs[i], "passes")
        state.set_space(node, node.outputs[0], Space(axis, ids, values))

    def _across(self, node: gs.Node, state: ChannelState, tracked: dict[int, Space]) -> None:
        spaces = list(tracked.values())
        if len(tracked) != len(node.inputs) or len({(s.axis, len(s)) for s in spaces}) > 1:
            state.block_node(node, "joins channels with a tensor whose channels have no prunable origin")
            return
        for space in spaces[1:]:
            state.tie(spaces[0].ids, space.ids, node, "joins its inputs' channels position by position")
        stacked = np.stack([s.values for s in spaces])
        values = np.where(np.all(stacked == stacked[:1], axis=0), stacked[0], np.nan)
        state.set_space(node, node.outputs[0], spaces[0].with_values(values))


class SplitHandler(Handler):
    """Split on the channel axis cuts the space into consecutive pieces; on another axis every piece keeps it."""

    op_types = ("Split",)

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        space = state.space(node.inputs[0])
        if space is None:
            return
        axis = normalize_axis(attr(node, "axis", 0), state.view.rank(node.inputs[0]))
        if space.axis != axis:
            for out in node.outputs:
                state.set_space(node, out, space)
            return
        sizes = self._sizes(node, state, len(space))
        if sizes is None:
            state.block_node(node, "its split sizes are not constant")
            return
        offset = 0
        for out, size in zip(node.outputs, sizes, strict=True):
            state.set_space(node, out, space.take(slice(offset, offset + size)))
            offset += size

    @staticmethod
    def _sizes(node: gs.Node, state: ChannelState, total: int) -> list[int] | None:
        if "split" in node.attrs:
            return [int(s) for s in node.attrs["split"]]
        if state.view.has_input(node, 1):
            value = state.view.input_constant(node, 1)
            return None if value is None else [int(s) for s in value]
        count = len(node.outputs)
        chunk = math.ceil(total / count)
        return [chunk] * (count - 1) + [total - chunk * (count - 1)]

    def prune(self, node: gs.Node, state: ChannelState, cut: Cut) -> None:
        space = state.space(node.inputs[0])
        keep = cut.keep(node.inputs[0])
        if space is None or keep is None:
            return
        if space.axis != normalize_axis(attr(node, "axis", 0), state.view.rank(node.inputs[0])):
            return
        bounds = np.cumsum([0] + self._sizes(node, state, len(space)))
        sizes = np.array([keep[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:], strict=True)], dtype=np.int64)
        if "split" in node.attrs or state.view.opset < 13:
            node.attrs["split"] = [int(s) for s in sizes]
        elif state.view.has_input(node, 1):
            state.view.replace_constant(node, 1, sizes)
        else:
            node.attrs.pop("num_outputs", None)
            state.view.append_constant(node, sizes, "split")


class SliceHandler(Handler):
    """Slice with step 1 on the channel axis keeps a contiguous range of it; other axes leave it untouched."""

    op_types = ("Slice",)

    def _params(self, node: gs.Node, state: ChannelState) -> list[np.ndarray] | None:
        if state.view.opset < 10:
            starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
            axes = node.attrs.get("axes", list(range(len(starts))))
            return [np.array(starts), np.array(ends), np.array(axes), np.ones(len(starts), dtype=np.int64)]
        starts, ends = state.view.input_constant(node, 1), state.view.input_constant(node, 2)
        axes = state.view.input_constant(node, 3) if state.view.has_input(node, 3) else None
        steps = state.view.input_constant(node, 4) if state.view.has_input(node, 4) else None
        if (
            starts is None
            or ends is None
            or (state.view.has_input(node, 3) and axes is None)
            or (state.view.has_input(node, 4) and steps is None)
        ):
            return None
        axes = np.arange(len(starts)) if axes is None else axes
        steps = np.ones(len(starts), dtype=np.int64) if steps is None else steps
        return [starts, ends, axes, steps]

    def _entry(self, node: gs.Node, state: ChannelState, space: Space) -> tuple[int, int, int, int] | None | str:
        """(entry index, start, end, step) of the channel axis in the Slice parameters; None if it is not sliced."""
        params = self._params(node, state)
        if params is None:
            return "its starts/ends/axes/steps are not constant"
        rank = state.view.rank(node.inputs[0])
        for j, (start, end, axis, step) in enumerate(zip(*params, strict=True)):
            if normalize_axis(int(axis), rank) == space.axis:
                size = len(space)
                bounds = [int(start) + size if start < 0 else int(start), int(end) + size if end < 0 else int(end)]
                return j, *(min(max(b, 0), size) for b in bounds), int(step)
        return None

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        space = state.space(node.inputs[0])
        if space is None:
            return
        entry = self._entry(node, state, space)
        if isinstance(entry, str) or (entry is not None and entry[3] != 1):
            state.block_node(
                node, entry if isinstance(entry, str) else "slices the channel axis with a step other than 1", [0]
            )
            return
        state.set_space(node, node.outputs[0], space if entry is None else space.take(slice(entry[1], entry[2])))

    def prune(self, node: gs.Node, state: ChannelState, cut: Cut) -> None:
        space = state.space(node.inputs[0])
        keep = cut.keep(node.inputs[0])
        if space is None or keep is None:
            return
        entry = self._entry(node, state, space)
        if entry is None:
            return
        j, start, end, _ = entry
        new_start = int(keep[:start].sum())
        new_end = new_start + int(keep[start:end].sum())
        if state.view.opset < 10:
            node.attrs["starts"] = [*node.attrs["starts"][:j], new_start, *node.attrs["starts"][j + 1 :]]
            node.attrs["ends"] = [*node.attrs["ends"][:j], new_end, *node.attrs["ends"][j + 1 :]]
            return
        for index, value in ((1, new_start), (2, new_end)):
            array = state.view.input_constant(node, index).copy()
            array[j] = value
            state.view.replace_constant(node, index, array)


def lookup_table(node: gs.Node, state: ChannelState) -> np.ndarray | None:
    """The node's table when it is an embedding lookup: constant 2-D float data read along axis 0 by indices
    that are computed (not constant) and of known rank; None otherwise."""
    view = state.view
    table = view.input_constant(node, 0)
    if table is None or table.ndim != 2 or table.dtype.kind != "f" or attr(node, "axis", 0) not in (0, -2):
        return None
    if view.constant(node.inputs[1]) is not None or view.rank(node.inputs[1]) is None:
        return None
    return table


class GatherHandler(Handler):
    """Gather with constant 1-D indices on the channel axis picks channels; on another axis it moves the axis.
    A lookup table (a constant 2-D float matrix read along axis 0 by computed indices: an embedding) creates
    channels, one per table column, on its output's last axis."""

    op_types = ("Gather",)

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        space = state.space(node.inputs[0])
        view = state.view
        if space is None:
            table = lookup_table(node, state)
            if table is not None:
                values = np.where(zero_slices(table, 1), 0.0, np.nan)
                state.produce(node, node.outputs[0], view.rank(node.inputs[1]), table.shape[1], values,
                              weight=table, weight_axis=1)
            return
        axis = normalize_axis(attr(node, "axis", 0), view.rank(node.inputs[0]))
        indices = view.constant(node.inputs[1])
        if space.axis == axis:
            if indices is None or indices.ndim != 1:
                state.block_node(node, "gathers from the channel axis with indices that are not a constant list", [0])
                return
            state.set_space(node, node.outputs[0], space.take(np.where(indices < 0, indices + len(space), indices)))
            return
        index_rank = view.rank(node.inputs[1])
        if index_rank is None:
            state.block_node(node, "the rank of its indices is unknown", [0])
            return
        new_axis = space.axis if space.axis < axis else space.axis + index_rank - 1
        state.set_space(node, node.outputs[0], space.moved(new_axis))

    def prune(self, node: gs.Node, state: ChannelState, cut: Cut) -> None:
        space = state.space(node.inputs[0])
        if space is None:
            keep_columns = cut.keep(node.outputs[0])
            if keep_columns is not None and lookup_table(node, state) is not None:
                state.view.replace_constant(node, 0, state.view.input_constant(node, 0)[:, keep_columns])
            return
        keep = cut.keep(node.inputs[0])
        axis = normalize_axis(attr(node, "axis", 0), state.view.rank(node.inputs[0]))
        if keep is None or space.axis != axis:
            return
        indices = state.view.constant(node.inputs[1])
        positions = np.where(indices < 0, indices + len(space), indices)
        renumbered = (np.cumsum(keep) - 1)[positions[keep[positions]]]
        state.view.replace_constant(node, 1, renumbered.astype(indices.dtype))


class TransposeHandler(Handler):
    op_types = ("Transpose",)

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        space = state.space(node.inputs[0])
        if space is None:
            return
        rank = state.view.rank(node.inputs[0])
        perm = list(attr(node, "perm", list(range(rank - 1, -1, -1)) if rank is not None else []))
        if space.axis not in perm:
            state.block_node(node, "its permutation is unknown")
            return
        state.set_space(node, node.outputs[0], space.moved(perm.index(space.axis)))


class ReshapeHandler(Handler):
    """Reshape: see `regroup` for how the channel axis is carried. The target is a constant, or a Concat of
    pieces (a dynamic batch read from a Shape, constants) whose channel entry sits in a constant piece."""

    op_types = ("Reshape",)

    @staticmethod
    def _target(state: ChannelState, node: gs.Node) -> tuple[list, list[tuple[int, int]] | None] | None:
        """The target entry by entry (ints; the inferred dim where computed at run time), and for a Concat
        target where each entry comes from (piece index, offset in the piece); None for a constant target."""
        view = state.view
        constant = view.input_constant(node, 1)
        if constant is not None:
            return [int(v) for v in constant], None
        concat, out_dims = view.producer(node.inputs[1]), view.shape(node.outputs[0])
        if concat is None or concat.op != "Concat" or out_dims is None:
            return None
        entries: list = []
        where: list[tuple[int, int]] = []
        for index, piece in enumerate(concat.inputs):
            value, shape = view.constant(piece), view.shape(piece)
            if shape is None or len(shape) != 1 or not isinstance(shape[0], int):
                return None
            entries += [int(v) for v in value] if value is not None else list(out_dims[len(entries):][: shape[0]])
            where += [(index, offset) for offset in range(shape[0])]
        return (entries, where) if len(entries) == len(out_dims) else None

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        space = state.space(node.inputs[0])
        if space is None:
            return
        target = self._target(state, node)
        in_dims = state.view.shape(node.inputs[0])
        if target is None or in_dims is None:
            state.block_node(node, "its target shape is computed at run time", [0])
            return
        entries, _ = target
        _carry(node, state, space, in_dims, resolve_target(in_dims, entries, bool(attr(node, "allowzero", 0))))
        out_space = state.space(node.outputs[0])
        if out_space is not None and not isinstance(entries[out_space.axis], int):
            state.block(out_space.ids, Decline(node.name, node.op, "runtime-shape",
                                               "the channel entry of its target shape is computed at run time"))

    def prune(self, node: gs.Node, state: ChannelState, cut: Cut) -> None:
        out_space, keep = state.space(node.outputs[0]), cut.keep(node.outputs[0])
        if out_space is None or keep is None:
            return
        entries, where = self._target(state, node)
        axis = out_space.axis
        if entries[axis] == -1:
            return
        if where is None:
            target = state.view.input_constant(node, 1).copy()
            target[axis] = int(keep.sum())
            state.view.replace_constant(node, 1, target)
            return
        own = state.view.duplicate(state.view.producer(node.inputs[1]))  # other Reshapes may share the target
        node.inputs[1] = own.outputs[0]
        index, offset = where[axis]
        piece = state.view.constant(own.inputs[index]).copy()
        piece[offset] = int(keep.sum())
        state.view.replace_constant(own, index, piece)


class FlattenHandler(Handler):
    op_types = ("Flatten",)

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        space = state.space(node.inputs[0])
        if space is None:
            return
        in_dims = state.view.shape(node.inputs[0])
        if in_dims is None:
            state.block_node(node, "its input shape is unknown", [0])
            return
        axis = normalize_axis(attr(node, "axis", 1), len(in_dims))
        _carry(node, state, space, in_dims, (_product(in_dims[:axis]), _product(in_dims[axis:])))


def _product(dims: tuple) -> int | str | None:
    if all(isinstance(d, int) for d in dims):
        return math.prod(dims)
    symbolic = [d for d in dims if not isinstance(d, int)]
    if len(symbolic) == 1 and isinstance(symbolic[0], str) and math.prod(d for d in dims if isinstance(d, int)) == 1:
        return symbolic[0]
    return None


def _carry(node: gs.Node, state: ChannelState, space: Space, in_dims: tuple, out_dims: tuple | str) -> None:
    result = out_dims if isinstance(out_dims, str) else regroup(in_dims, out_dims, space, state.atoms.roots)
    if isinstance(result, str):
        state.block_node(node, result, [0])
        return
    for row in result.ties:
        state.tie_all(
            row,
            node,
            "splits the channel axis over several axes; channels that share the inner index are removed together",
        )
    state.set_space(node, node.outputs[0], result.space)


class SqueezeHandler(Handler):
    op_types = ("Squeeze", "Unsqueeze")

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        space = state.space(node.inputs[0])
        if space is None:
            return
        axes = axes_operand(state, node, 1)
        in_shape = state.view.shape(node.inputs[0])
        if axes is None or in_shape is None:
            state.block_node(node, "its axes or input shape are unknown", [0])
            return
        if node.op == "Squeeze":
            axes = [normalize_axis(a, len(in_shape)) for a in axes] or [i for i, d in enumerate(in_shape) if d == 1]
            if space.axis in axes:
                state.block_node(node, "squeezes the channel axis", [0])
                return
            new_axis = space.axis - sum(a < space.axis for a in axes)
        else:
            out_rank = len(in_shape) + len(axes)
            inserted = sorted(normalize_axis(a, out_rank) for a in axes)
            kept = [i for i in range(out_rank) if i not in inserted]
            new_axis = kept[space.axis]
        state.set_space(node, node.outputs[0], space.moved(new_axis))


class ExpandHandler(Handler):
    """Expand with a constant shape: the channel axis keeps its place (shifted by added leading dims)."""

    op_types = ("Expand",)

    def _entry(self, node: gs.Node, state: ChannelState, space: Space) -> tuple[np.ndarray, int, int] | None:
        shape = state.view.input_constant(node, 1)
        rank = state.view.rank(node.inputs[0])
        if shape is None or rank is None:
            return None
        out_rank = max(rank, len(shape))
        new_axis = space.axis + out_rank - rank
        return shape, new_axis, new_axis - (out_rank - len(shape))

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        space = state.space(node.inputs[0])
        if space is None:
            return
        entry = self._entry(node, state, space)
        if entry is None or (entry[2] >= 0 and entry[0][entry[2]] not in (1, len(space))):
            state.block_node(node, "its target shape is not a constant that keeps the channel axis", [0])
            return
        state.set_space(node, node.outputs[0], space.moved(entry[1]))

    def prune(self, node: gs.Node, state: ChannelState, cut: Cut) -> None:
        space, keep = state.space(node.inputs[0]), cut.keep(node.inputs[0])
        if space is None or keep is None:
            return
        shape, _, index = self._entry(node, state, space)
        if index >= 0 and shape[index] == len(space) and len(space) > 1:
            shape = shape.copy()
            shape[index] = int(keep.sum())
            state.view.replace_constant(node, 1, shape)


class TileHandler(Handler):
    op_types = ("Tile",)

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        space = state.space(node.inputs[0])
        if space is None:
            return
        repeats = state.view.input_constant(node, 1)
        if repeats is None or int(repeats[space.axis]) != 1:
            state.block_node(node, "repeats the channel axis", [0])
            return
        state.set_space(node, node.outputs[0], space)
