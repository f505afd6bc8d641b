"""Ops that act on each channel on its own: activations, elementwise arithmetic, normalizations."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.declines import Decline
from passes.graph.channels import ChannelState, NormScales, Space
from passes.graph.constants import evaluate
from passes.graph.handler import Cut, Handler, aligned_axis, attr, normalize_axis

UNARY_OPS = (
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Gelu",
    "Elu",
    "Selu",
    "Celu",
    "Softplus",
    "Softsign",
    "Mish",
    "Erf",
    "ThresholdedRelu",
    "Clip",
    "Identity",
    "Cast",
    "Dropout",
    "Abs",
    "Neg",
    "Exp",
    "Log",
    "Sqrt",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Sin",
    "Cos",
    "Not",
    "IsNaN",
    "IsInf",
)

NARY_OPS = (
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Max",
    "Min",
    "Sum",
    "Mean",
    "Where",
    "PRelu",
    "Mod",
    "Equal",
    "Greater",
    "Less",
    "GreaterOrEqual",
    "LessOrEqual",
    "And",
    "Or",
    "Xor",
)


class UnaryHandler(Handler):
    """Activations and casts: channel i of the output is a function of channel i of the input only."""

    op_types = UNARY_OPS

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        space = state.space(node.inputs[0])
        if space is None:
            return
        if any(state.space(t) is not None for t in node.inputs[1:]):
            state.block_node(node, "channels reach one of its scalar parameters", list(range(1, len(node.inputs))))
        if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
            state.block_node(node, "its mask output is used")
        if node.op in ("Identity", "Dropout"):
            values = space.values
        else:
            values = evaluate(state.view, node, {0: space}, space.axis, len(space))
        state.set_space(node, node.outputs[0], space.with_values(values))


class ElementwiseHandler(Handler):
    """Broadcasting elementwise ops. Two activations with channels on the same axis are tied position by
    position (a residual Add, a squeeze-excitation Mul); a constant operand that varies along the channel
    axis is sliced with it; anything else that varies along that axis blocks the channels."""

    op_types = NARY_OPS

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        view = state.view
        out = node.outputs[0]
        tracked = {i: s for i, t in enumerate(node.inputs) if (s := state.space(t)) is not None}
        if not tracked:
            return
        ranks = [view.rank(t) if t.name else 0 for t in node.inputs]
        out_rank = view.rank(out)
        if out_rank is None or any(r is None for r in ranks):
            state.block_node(node, "an operand has an unknown rank")
            return
        axes = {s.axis + out_rank - ranks[i] for i, s in tracked.items()}
        sizes = {len(s) for s in tracked.values()}
        if len(axes) > 1 or len(sizes) > 1:
            state.block_node(node, "the channels of its operands sit on different axes")
            return
        axis, size = axes.pop(), sizes.pop()
        first = next(iter(tracked.values()))
        for space in list(tracked.values())[1:]:
            state.tie(first.ids, space.ids, node, "combines channels position by position")
        zero = np.zeros(size, dtype=bool)
        for i, tensor in enumerate(node.inputs):
            if i in tracked or not tensor.name:
                continue
            local = aligned_axis(axis, out_rank, ranks[i])
            shape = view.shape(tensor)
            if local < 0 or shape[local] == 1:
                continue
            value = view.constant(tensor)
            if value is None or shape[local] != size:
                reason = Decline(
                    node.name,
                    node.op,
                    "no-prunable-origin",
                    f"combines the channels with {tensor.name}, whose channels have no prunable origin",
                )
                for space in tracked.values():
                    state.block(space.ids, reason)
                continue
            state.member(node, tensor, "slices")
            zero |= np.all(np.moveaxis(value, local, 0).reshape(size, -1) == 0, axis=1)
        values = evaluate(view, node, tracked, axis, size)
        if node.op == "Mul":
            for space in tracked.values():
                zero |= space.values == 0
            values = np.where(zero, 0.0, values)
        ids = np.max(np.stack([s.ids for s in tracked.values()]), axis=0)
        state.set_space(node, out, Space(axis, ids, values))

    def prune(self, node: gs.Node, state: ChannelState, cut: Cut) -> None:
        view = state.view
        out = node.outputs[0]
        space = state.space(out)
        keep = cut.keep(out)
        if space is None or keep is None:
            return
        out_rank = view.rank(out)
        for i, tensor in enumerate(node.inputs):
            value = view.constant(tensor) if tensor.name else None
            if value is None:
                continue
            local = aligned_axis(space.axis, out_rank, value.ndim)
            if local >= 0 and value.shape[local] == len(keep) and len(keep) > 1:
                view.replace_constant(node, i, np.compress(keep, value, axis=local))


class BatchNormHandler(Handler):
    """BatchNormalization (inference): per-channel scale, bias, mean and variance on axis 1."""

    op_types = ("BatchNormalization",)
    params = (1, 2, 3, 4)

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        x = node.inputs[0]
        space = state.space(x)
        if space is None:
            return
        if space.axis != 1:
            state.block_node(node, f"normalizes axis 1 but the channels sit on axis {space.axis}")
            return
        params = [state.view.input_constant(node, i) for i in self.params]
        if any(p is None or p.size != len(space) for p in params):
            state.block_node(node, "its parameters are not per-channel constants")
            return
        if any(o.outputs for o in node.outputs[1:]):
            state.block_node(node, "its training-mode statistics outputs are used")
            return
        scale, bias = params[0], params[1]
        values = evaluate(state.view, node, {0: space}, 1, len(space))
        values = np.where(scale == 0, bias, values)  # scale 0: the output is the bias whatever the input
        state.norms.append(NormScales(node.name, x.name, np.abs(scale.astype(np.float64))))
        state.member(node, x, "slices")
        state.set_space(node, node.outputs[0], space.with_values(values))

    def prune(self, node: gs.Node, state: ChannelState, cut: Cut) -> None:
        keep = cut.keep(node.inputs[0])
        if keep is None:
            return
        for i in self.params:
            state.view.replace_constant(node, i, state.view.input_constant(node, i)[keep])


class InstanceNormHandler(BatchNormHandler):
    """InstanceNormalization: per-channel scale and bias; statistics are per channel, so channels are independent."""

    op_types = ("InstanceNormalization",)
    params = (1, 2)


class GroupNormHandler(Handler):
    """GroupNormalization (opset 18-20: scale and bias per group): channels of one group are one unit."""

    op_types = ("GroupNormalization",)
    since_version = 18
    per_channel_params = False

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        space = state.space(node.inputs[0])
        if space is None:
            return
        groups = attr(node, "num_groups", 1)
        if space.axis != 1 or len(space) % groups:
            state.block_node(node, "the channels are not on axis 1 in whole groups")
            return
        if any(state.view.input_constant(node, i) is None for i in (1, 2)):
            state.block_node(node, "its scale or bias is not a constant")
            return
        for ids in np.split(space.ids, groups):
            state.tie_all(ids, node, "normalizes each group of channels together")
        state.member(node, node.inputs[0], "ties")
        state.set_space(node, node.outputs[0], space.with_values(self._constants(node, state, space, groups)))

    def _constants(self, node: gs.Node, state: ChannelState, space: Space, groups: int) -> np.ndarray:
        """A group whose channels are all constants normalizes to constants: (v - mean) / sqrt(var + eps)."""
        values = space.values.reshape(groups, -1)
        mean, var = values.mean(axis=1, keepdims=True), values.var(axis=1, keepdims=True)
        normalized = (values - mean) / np.sqrt(var + attr(node, "epsilon", 1e-5))
        scale, bias = (state.view.input_constant(node, i).astype(np.float64) for i in (1, 2))
        shape = values.shape if self.per_channel_params else (groups, 1)
        return (normalized * scale.reshape(shape) + bias.reshape(shape)).ravel()

    def prune(self, node: gs.Node, state: ChannelState, cut: Cut) -> None:
        keep = cut.keep(node.inputs[0])
        if keep is None:
            return
        groups = attr(node, "num_groups", 1)
        kept_groups = keep.reshape(groups, -1)[:, 0]
        node.attrs["num_groups"] = int(kept_groups.sum())
        mask = keep if self.per_channel_params else kept_groups
        for i in (1, 2):
            state.view.replace_constant(node, i, state.view.input_constant(node, i)[mask])


class GroupNormHandler_21(GroupNormHandler):  # noqa: N801 -- the opset suffix is the naming rule for variants
    """GroupNormalization (opset 21+): scale and bias are per channel."""

    since_version = 21
    per_channel_params = True


class LayerNormHandler(Handler):
    """LayerNormalization: channels on a normalized axis change the mean and variance when removed (declined);
    channels on a leading axis pass through."""

    op_types = ("LayerNormalization",)

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        space = state.space(node.inputs[0])
        if space is None:
            return
        rank = state.view.rank(node.inputs[0])
        if rank is None or space.axis >= normalize_axis(attr(node, "axis", -1), rank):
            state.block_node(
                node,
                "normalizes over the channel axis, so removing channels would change the mean and variance of the rest",
                [0],
            )
            return
        state.set_space(node, node.outputs[0], space.with_values(np.full(len(space), np.nan)))


class SoftmaxHandler(Handler):
    """Softmax, LogSoftmax, Hardmax: channels on the normalized axis are declined; others pass through."""

    op_types = ("Softmax", "LogSoftmax", "Hardmax")

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        space = state.space(node.inputs[0])
        if space is None:
            return
        rank = state.view.rank(node.inputs[0]) or space.axis + 1
        if state.view.opset < 13:
            first = normalize_axis(attr(node, "axis", 1), rank)
            hit = space.axis >= first
        else:
            hit = space.axis == normalize_axis(attr(node, "axis", -1), rank)
        if hit:
            state.block_node(node, "normalizes over the channel axis")
            return
        state.set_space(node, node.outputs[0], space.with_values(np.full(len(space), np.nan)))
