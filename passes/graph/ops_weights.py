"""Ops with constant weights: they create channels (output rows) and reduce channels (input columns)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.declines import Decline
from passes.graph.channels import ChannelState, ConsumerTerm, Space
from passes.graph.handler import Cut, Handler, attr, zero_slices


def _no_padding(node: gs.Node, weight: np.ndarray) -> bool:
    """True when no output position sees zero padding, so a constant input channel adds the same amount everywhere."""
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return all(k == 1 for k in weight.shape[2:])
    return not any(attr(node, "pads", []))


def _weight_and_bias(node: gs.Node, state: ChannelState) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A (transposed) convolution's constant weight and bias (None when absent); None, with the node blocked, when
    either is not a constant."""
    view = state.view
    weight, bias = view.input_constant(node, 1), view.input_constant(node, 2)
    if weight is None or (view.has_input(node, 2) and bias is None):
        state.block_node(node, "its weight or bias is not a constant")
        return None
    return weight, bias


def _input_channel_space(node: gs.Node, state: ChannelState, channels: int) -> Space | None:
    """The channel space reaching the data input as its `channels` input channels (axis 1); one arriving any other
    way blocks the node and counts as none."""
    in_space = state.space(node.inputs[0])
    if in_space is not None and (in_space.axis != 1 or len(in_space) != channels):
        state.block_node(node, "channels reach it on an axis other than its input channels")
        return None
    return in_space


def _tie_groups(state: ChannelState, node: gs.Node, in_space: Space | None, out_space: Space, groups: int,
                cin: int) -> None:
    """Grouped convolution: input group g and output group g are one unit (a group is pruned whole or kept)."""
    in_ids = in_space.ids if in_space is not None else Space.opaque(1, cin).ids
    why = "a grouped convolution removes input and output groups together"
    for g_in, g_out in zip(np.split(in_ids, groups), np.split(out_space.ids, groups), strict=True):
        state.tie_all(np.concatenate([g_in, g_out]), node, why)


def _align_groups(state: ChannelState, node: gs.Node, in_space: Space | None, out_space: Space,
                  weight: np.ndarray, groups: int) -> None:
    """Grouped convolution channel by channel: every group must stay equally wide, so output position m of every
    group is one unit, and so is input position l of every group; the input channels are reduced (a consumer).

    With 2 groups of 3 inputs and 2 outputs: input units {0, 3}, {1, 4}, {2, 5}; output units {0, 2}, {1, 3}.
    """
    why = "a grouped convolution keeps every group equally wide (the same position goes in every group)"
    for column in out_space.ids.reshape(groups, -1).T:
        state.tie_all(column, node, why)
    if in_space is None:
        return
    for column in in_space.ids.reshape(groups, -1).T:
        state.tie_all(column, node, why)
    per_group = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)
    silent = ~np.any(per_group != 0, axis=(1, 3)).reshape(-1)
    state.consumers.append(ConsumerTerm(node.name, node.inputs[0].name, silent, _no_padding(node, weight)))
    state.member(node, node.inputs[0], "consumes")


def _grouped_values(
    weight: np.ndarray, bias: np.ndarray, in_values: np.ndarray | None, groups: int, no_padding: bool
) -> np.ndarray:
    """Constants of a grouped Conv's outputs: bias where the filter or its input group is zero, the full sum when
    the whole input group is constant and no padding is involved."""
    cout = weight.shape[0]
    rows_zero = zero_slices(weight, 0)
    values = np.where(rows_zero, bias, np.nan)
    if in_values is None:
        return values
    per_group = in_values.reshape(groups, -1)
    group_of_out = np.repeat(np.arange(groups), cout // groups)
    zero_in = np.all(per_group == 0, axis=1)[group_of_out]
    values = np.where(zero_in, bias, values)
    if no_padding:
        taps = weight.reshape(cout, weight.shape[1], -1).sum(axis=2)
        summed = (taps * per_group[group_of_out]).sum(axis=1) + bias
        values = np.where(np.isfinite(summed), summed, values)
    return values


def _reduced_inputs(node: gs.Node, weight: np.ndarray, bias: np.ndarray, groups: int, cut: Cut
                    ) -> tuple[np.ndarray, np.ndarray, bool]:
    """(weight, bias, folded) once the removed input channels are gone: each group's weight loses the columns of
    its removed inputs (the same number in every group), and a removed input that is one constant everywhere is
    folded into the bias of its group's outputs. groups == 1 is an ordinary convolution."""
    positions, constants = cut.removed_constants(node.inputs[0])
    cout, width = weight.shape[0], weight.shape[1]
    folded = bool(len(positions))
    if folded:
        taps = weight.reshape(cout, width, -1).sum(axis=2)  # [Cout, Cin/group]
        same_group = (np.arange(cout) // (cout // groups))[:, None] == (positions // width)[None, :]
        bias = (bias + np.where(same_group, taps[:, positions % width], 0) @ constants).astype(weight.dtype)
        if not _no_padding(node, weight):
            cut.note(node, f"folded the constants of {len(positions)} removed input channels into the bias; "
                           "inexact at the zero-padded border")
    keep_in = cut.keep(node.inputs[0])
    if keep_in is not None:
        per_group = weight.reshape(groups, cout // groups, width, *weight.shape[2:])
        weight = np.concatenate([w[:, keep] for w, keep in zip(per_group, keep_in.reshape(groups, width),
                                                                  strict=True)])
    return weight, bias, folded


class ConvHandler(Handler):
    """Conv (1-D/2-D/3-D). Output channels are created; input channels are reduced (group == 1) or tied to
    their output group (grouped and depthwise convolutions, pruned in whole groups). A grouped Conv whose whole
    groups all end up in one unit (a channel shuffle before it ties channel j of every group) is analysed again
    channel by channel instead (`_align_groups`): every group loses the same positions and keeps its group count."""

    op_types = ("Conv",)

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        constants = _weight_and_bias(node, state)
        if constants is None:
            return
        weight, bias = constants
        groups = attr(node, "group", 1)
        cout, cin = weight.shape[0], weight.shape[1] * groups
        bias = bias if bias is not None else np.zeros(cout)
        x = node.inputs[0]
        in_space = _input_channel_space(node, state, cin)
        if groups == 1:
            values = np.where(zero_slices(weight, 0), bias, np.nan)
            state.produce(node, node.outputs[0], 1, cout, values, weight=weight, weight_axis=0)
            if in_space is not None:
                term = ConsumerTerm(node.name, x.name, zero_slices(weight, 1), _no_padding(node, weight))
                state.consumers.append(term)
                state.member(node, x, "consumes")
            return
        in_values = in_space.values if in_space is not None else None
        values = _grouped_values(weight, bias, in_values, groups, _no_padding(node, weight))
        out_space = state.produce(node, node.outputs[0], 1, cout, values, weight=weight, weight_axis=0)
        if state.in_alternate(node):
            _align_groups(state, node, in_space, out_space, weight, groups)
            return
        _tie_groups(state, node, in_space, out_space, groups, cin)
        state.member(node, x, "ties")

    def reconsider(self, node: gs.Node, state: ChannelState) -> bool:
        """A grouped (not depthwise) Conv whose output channels all fell into one unit, or only into blocked
        ones: whole groups cannot go, so it is analysed channel by channel."""
        space, weight = state.space(node.outputs[0]), state.view.input_constant(node, 1)
        if attr(node, "group", 1) == 1 or space is None or weight is None or weight.shape[1] == 1 \
                or state.in_alternate(node):
            return False
        roots = np.unique(state.atoms.roots(space.ids))
        return len(roots) == 1 or all(state.atoms.reasons(int(r)) for r in roots)

    def prune(self, node: gs.Node, state: ChannelState, cut: Cut) -> None:
        view = state.view
        weight = view.input_constant(node, 1)
        has_bias = view.has_input(node, 2)
        bias = view.input_constant(node, 2) if has_bias else np.zeros(weight.shape[0], dtype=weight.dtype)
        keep_in, keep_out = cut.keep(node.inputs[0]), cut.keep(node.outputs[0])
        groups = attr(node, "group", 1)
        folded = False
        if groups == 1 or state.in_alternate(node):
            weight, bias, folded = _reduced_inputs(node, weight, bias, groups, cut)
        elif keep_out is not None:
            node.attrs["group"] = int(keep_out.reshape(groups, -1)[:, 0].sum())
        if keep_out is not None:
            weight, bias = weight[keep_out], bias[keep_out]
        if keep_in is None and keep_out is None and not folded:
            return
        view.replace_constant(node, 1, weight)
        if has_bias:
            view.replace_constant(node, 2, bias)
        elif folded:
            view.append_constant(node, bias, "bias")


class ConvTransposeHandler(Handler):
    """ConvTranspose: weight [Cin, Cout/group, k...]; input channels reduced, output channels created."""

    op_types = ("ConvTranspose",)

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        constants = _weight_and_bias(node, state)
        if constants is None:
            return
        weight, bias = constants
        groups = attr(node, "group", 1)
        cin, cout_g = weight.shape[0], weight.shape[1]
        cout = cout_g * groups
        bias = bias if bias is not None else np.zeros(cout)
        x = node.inputs[0]
        in_space = _input_channel_space(node, state, cin)
        # filters by output channel: [Cout, Cin/group, k...]
        per_out = weight.reshape(groups, cin // groups, cout_g, *weight.shape[2:]).swapaxes(1, 2)
        per_out = per_out.reshape(cout, cin // groups, *weight.shape[2:])
        values = np.where(zero_slices(per_out, 0), bias, np.nan)
        out_space = state.produce(node, node.outputs[0], 1, cout, values, weight=per_out, weight_axis=0)
        if groups > 1:
            _tie_groups(state, node, in_space, out_space, groups, cin)
            state.member(node, x, "ties")
        elif in_space is not None:
            # overlapping taps make a constant input non-uniform in the output: never folded exactly
            state.consumers.append(ConsumerTerm(node.name, x.name, zero_slices(weight, 0), absorbs=False))
            state.member(node, x, "consumes")

    def prune(self, node: gs.Node, state: ChannelState, cut: Cut) -> None:
        view = state.view
        weight = view.input_constant(node, 1)
        keep_in, keep_out = cut.keep(node.inputs[0]), cut.keep(node.outputs[0])
        groups = attr(node, "group", 1)
        positions, _ = cut.removed_constants(node.inputs[0])
        if len(positions) and groups == 1:
            cut.note(
                node,
                f"dropped the constants of {len(positions)} removed input channels (a transposed "
                "convolution spreads them unevenly, so they cannot be folded into its bias)",
            )
        if keep_in is not None:
            weight = weight[keep_in]
            if groups > 1:
                node.attrs["group"] = int(keep_in.reshape(groups, -1)[:, 0].sum())
        if keep_out is not None and groups == 1:
            weight = weight[:, keep_out]
        if keep_in is None and keep_out is None:
            return
        view.replace_constant(node, 1, weight)
        if keep_out is not None and view.has_input(node, 2):
            view.replace_constant(node, 2, view.input_constant(node, 2)[keep_out])


class GemmHandler(Handler):
    """Gemm: Y = alpha·op(A)·op(B) + beta·C. Columns of Y are created; the K axis of A is reduced."""

    op_types = ("Gemm",)

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        view = state.view
        b = view.input_constant(node, 1)
        c = view.input_constant(node, 2)
        if b is None or b.ndim != 2:
            state.block_node(node, "its B operand is not a constant matrix")
            return
        bk = b.T if attr(node, "transB", 0) else b  # [K, N]
        k, n = bk.shape
        beta = attr(node, "beta", 1.0)
        a = node.inputs[0]
        in_space = state.space(a)
        k_axis = 0 if attr(node, "transA", 0) else 1
        if in_space is not None and (in_space.axis != k_axis or len(in_space) != k):
            state.block_node(node, "channels reach it on an axis other than its K axis")
            in_space = None
        if in_space is not None:
            state.consumers.append(ConsumerTerm(node.name, a.name, zero_slices(bk, 0), absorbs=beta != 0))
            state.member(node, a, "consumes")
        column_constant = self._bias_per_column(c, n, beta)
        values = np.where(zero_slices(bk, 1), column_constant, np.nan)
        out_space = state.produce(node, node.outputs[0], 1, n, values, weight=bk, weight_axis=1)
        if view.has_input(node, 2) and c is None:
            reason = _reason(node, "its C operand is not a constant, so its columns cannot be cut")
            state.block(out_space.ids, reason)
            if state.space(node.inputs[2]) is not None:
                state.block(state.space(node.inputs[2]).ids, reason)

    @staticmethod
    def _bias_per_column(c: np.ndarray | None, n: int, beta: float) -> np.ndarray:
        if c is None:
            return np.zeros(n)
        rows = np.broadcast_to(c, (c.shape[0] if c.ndim == 2 else 1, n)).astype(np.float64)
        return np.where(np.all(rows == rows[:1], axis=0), beta * rows[0], np.nan)

    def prune(self, node: gs.Node, state: ChannelState, cut: Cut) -> None:
        view = state.view
        trans_b = attr(node, "transB", 0)
        b = view.input_constant(node, 1)
        bk = b.T if trans_b else b
        keep_in, keep_out = cut.keep(node.inputs[0]), cut.keep(node.outputs[0])
        has_c = view.has_input(node, 2)
        c = view.input_constant(node, 2) if has_c else None
        positions, constants = cut.removed_constants(node.inputs[0])
        if len(positions):
            contribution = attr(node, "alpha", 1.0) * (constants @ bk[positions]) / attr(node, "beta", 1.0)
            if c is not None:
                contribution = np.broadcast_to(c, np.broadcast_shapes(c.shape, contribution.shape)) + contribution
            c = contribution.astype(b.dtype)
        if keep_in is not None:
            bk = bk[keep_in]
        if keep_out is not None:
            bk = bk[:, keep_out]
            if c is not None and c.ndim >= 1 and c.shape[-1] == len(keep_out) and len(keep_out) > 1:
                c = c[..., keep_out]
        if keep_in is None and keep_out is None and not len(positions):
            return
        view.replace_constant(node, 1, bk.T if trans_b else bk)
        if has_c:
            view.replace_constant(node, 2, c)
        elif c is not None:
            view.append_constant(node, c, "C")


class MatMulHandler(Handler):
    """MatMul with one constant 2-D operand (a Linear layer), or between two activations (attention).

    With a constant weight W[K, N] the K axis of the activation is reduced and N columns are created; a
    channel axis elsewhere in the activation passes through. Between activations the contracted axes are tied.
    """

    op_types = ("MatMul",)

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        view = state.view
        a, b = node.inputs[0], node.inputs[1]
        ra, rb, ro = view.rank(a), view.rank(b), view.rank(node.outputs[0])
        if ra is None or rb is None or ro is None or ra < 2 or rb < 2:
            state.block_node(node, "one operand is 1-D or of unknown rank")
            return
        wa, wb = view.constant(a), view.constant(b)
        if wb is not None and wa is None:
            self._with_weight(node, state, a, wb, weight_is_b=True, rank=ra, out_rank=ro)
        elif wa is not None and wb is None:
            self._with_weight(node, state, b, wa, weight_is_b=False, rank=rb, out_rank=ro)
        elif wa is None and wb is None:
            self._between_activations(node, state, ra, rb, ro)

    def _with_weight(
        self,
        node: gs.Node,
        state: ChannelState,
        x: gs.Tensor,
        weight: np.ndarray,
        weight_is_b: bool,
        rank: int,
        out_rank: int,
    ) -> None:
        if weight.ndim != 2:
            state.block_node(node, "its constant operand is not a 2-D matrix")
            return
        reduced_axis, kept_axis = (rank - 1, 1) if weight_is_b else (rank - 2, 0)
        in_space = state.space(x)
        out = node.outputs[0]
        if in_space is not None and in_space.axis != reduced_axis:
            # the channels sit on an axis the product does not touch: they pass through
            passed = np.where(in_space.values == 0, 0.0, np.nan)
            state.set_space(node, out, Space(in_space.axis + out_rank - rank, in_space.ids, passed))
            return
        if in_space is not None:
            silent = zero_slices(weight, 1 - kept_axis)
            state.consumers.append(ConsumerTerm(node.name, x.name, silent, absorbs=True))
            state.member(node, x, "consumes")
        count = weight.shape[kept_axis]
        values = np.where(zero_slices(weight, kept_axis), 0.0, np.nan)
        out_axis = out_rank - 1 if weight_is_b else out_rank - 2
        state.produce(node, out, out_axis, count, values, weight=weight, weight_axis=kept_axis)

    def _between_activations(self, node: gs.Node, state: ChannelState, ra: int, rb: int, ro: int) -> None:
        a, b = node.inputs[0], node.inputs[1]
        sa, sb = state.space(a), state.space(b)
        contracted = [s for s, axis in ((sa, ra - 1), (sb, rb - 2)) if s is not None and s.axis == axis]
        if len(contracted) == 1:
            state.block(
                contracted[0].ids,
                _reason(node, "contracts the channels with a tensor whose channels have no prunable origin"),
            )
        elif len(contracted) == 2:
            state.tie(sa.ids, sb.ids, node, "contracts the channels of both operands together")
            silent = (sa.values == 0) | (sb.values == 0)
            state.consumers.append(ConsumerTerm(node.name, a.name, silent, absorbs=False))
            state.member(node, a, "consumes")
            state.member(node, b, "consumes")
        passing = []
        if sa is not None and sa.axis != ra - 1:
            passing.append(sa.moved(sa.axis + ro - ra))
        if sb is not None and sb.axis != rb - 2:
            passing.append(sb.moved(ro - 1 if sb.axis == rb - 1 else sb.axis + ro - rb))
        if len(passing) == 2 and passing[0].axis == passing[1].axis and len(passing[0]) == len(passing[1]):
            state.tie(passing[0].ids, passing[1].ids, node, "broadcasts the channels of both operands together")
            passing = passing[:1]
        if len(passing) > 1:
            state.block(passing[1].ids, _reason(node, "its output would carry channels on two axes"))
        if passing:
            space = passing[0]
            state.set_space(node, node.outputs[0], space.with_values(np.where(space.values == 0, 0.0, np.nan)))

    def prune(self, node: gs.Node, state: ChannelState, cut: Cut) -> None:
        view = state.view
        a, b = node.inputs[0], node.inputs[1]
        wa, wb = view.constant(a), view.constant(b)
        if (wa is None) == (wb is None) or (wa if wa is not None else wb).ndim != 2:
            return
        weight_is_b = wb is not None
        x = a if weight_is_b else b
        weight = wb if weight_is_b else wa.T  # rows reduce the channels of x, columns create output channels
        in_space = state.space(x)
        reduced = in_space is not None and in_space.axis == view.rank(x) - (1 if weight_is_b else 2)
        keep_in = cut.keep(x) if reduced else None
        keep_out = cut.keep(node.outputs[0]) if in_space is None or reduced else None
        contribution = None
        if keep_in is not None:
            positions, constants = cut.removed_constants(x)
            if len(positions):
                contribution = constants @ weight[positions]
            weight = weight[keep_in]
        if keep_out is not None:
            weight = weight[:, keep_out]
            contribution = contribution[keep_out] if contribution is not None else None
        if keep_in is None and keep_out is None:
            return
        view.replace_constant(node, 1 if weight_is_b else 0, weight if weight_is_b else weight.T)
        if contribution is not None:
            bias = contribution.astype(weight.dtype)
            view.add_bias_after(node, bias if weight_is_b else bias.reshape(-1, 1))


def _reason(node: gs.Node, why: str) -> Decline:
    return Decline(node.name, node.op, "channel-blocked", why)
