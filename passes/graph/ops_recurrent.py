"""Recurrent layers (LSTM, GRU, RNN): they reduce their input channels and create their hidden units.

ONNX writes them as X [seq, batch, I] (layout 0; [batch, seq, I] with layout 1), W [D, G*H, I],
R [D, G*H, H], B [D, 2*G*H] (input bias, then recurrent bias), initial_h/initial_c [D, batch, H], P [D, 3*H]
(LSTM peepholes), with G gates (LSTM 4: i o f c; GRU 3: z r h; RNN 1) and D directions. So:

- the input size I is a consumer's reduction axis: W[:, :, p] multiplies input channel p. A removed input
  channel that is one constant c everywhere folds exactly into the input bias (B[d, :G*H] += W[d, :, p]·c).
- hidden unit j is a channel of Y [seq, D, batch, H] (axis 3), Y_h and Y_c [D, batch, H] (axis 2). It owns
  rows j of every gate in W, R and B (all directions: the unit is removed in every direction at once), column j
  of R (what it feeds back) and P's entries. Its output is exactly 0 when its candidate gate (LSTM c, GRU h,
  RNN the only one) has zero rows in W and R and zero bias, and the initial state is zero: then removal is exact.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.declines import Decline
from passes.graph.channels import ChannelState, ConsumerTerm
from passes.graph.handler import Cut, Handler, zero_slices

_X, _W, _R, _B, _SEQ, _H0, _C0, _P = range(8)


class RecurrentHandler(Handler):
    """Shared by LSTM, GRU and RNN; subclasses give the gate count and the index of the candidate gate."""

    gates: ClassVar[int] = 1
    candidate: ClassVar[int] = 0  # the gate whose zero rows make the unit's output 0
    states: ClassVar[tuple[int, ...]] = (_H0,)  # initial-state inputs

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        view = state.view
        w, r = view.input_constant(node, _W), view.input_constant(node, _R)
        b = view.input_constant(node, _B)
        if w is None or r is None or (view.has_input(node, _B) and b is None):
            state.block_node(node, "its W, R or B input is not a constant")
            return
        directions, rows, inputs = w.shape
        hidden = rows // self.gates
        x = node.inputs[_X]
        in_space = state.space(x)
        if in_space is not None and (in_space.axis != 2 or len(in_space) != inputs):
            state.block_node(node, "channels reach it on an axis other than its input-size axis", indices=[_X])
        elif in_space is not None:
            state.consumers.append(ConsumerTerm(node.name, x.name, zero_slices(w, 2), absorbs=True))
            state.member(node, x, "consumes")
        self._produce_hidden(node, state, w, r, b, hidden)

    def _produce_hidden(self, node: gs.Node, state: ChannelState, w: np.ndarray, r: np.ndarray,
                        b: np.ndarray | None, hidden: int) -> None:
        outputs = [t for t in node.outputs if t.name]
        if not outputs:
            return
        per_unit = np.concatenate([_unit_rows(w, self.gates, hidden), _unit_rows(r, self.gates, hidden)], axis=1)
        values = np.where(self._silent_units(node, state, w, r, b, hidden), 0.0, np.nan)
        first, *others = [(t, 3 if i == 0 else 2) for i, t in enumerate(node.outputs) if t.name]
        space = state.produce(node, first[0], first[1], hidden, values, weight=per_unit, weight_axis=0)
        for tensor, axis in others:
            state.set_space(node, tensor, space.moved(axis), role="produces")
        loose = [i for i in (*self.states, _P) if state.view.has_input(node, i)
                 and state.view.input_constant(node, i) is None and not _zero_fill(state.view, node, i)]
        if loose:
            name = node.inputs[loose[0]].name
            why = f"its initial state or peephole input {name!r} is not a constant, so its hidden size cannot be cut"
            state.block(space.ids, Decline(node.name, node.op, "non-constant-state", why))

    def _silent_units(self, node: gs.Node, state: ChannelState, w: np.ndarray, r: np.ndarray,
                      b: np.ndarray | None, hidden: int) -> np.ndarray:
        """Units whose output is 0 for every input: zero candidate-gate rows and bias, zero initial state, and
        activations that map 0 to 0 (the defaults; a Sigmoid candidate would not)."""
        activations = node.attrs.get("activations")
        if activations and any((a.decode() if isinstance(a, bytes) else a) not in ("Tanh", "Relu")
                               for a in activations[1 if self.gates > 1 else 0:]):
            return np.zeros(hidden, dtype=bool)
        gate = slice(self.candidate * hidden, (self.candidate + 1) * hidden)
        silent = ~np.any(w[:, gate, :] != 0, axis=(0, 2)) & ~np.any(r[:, gate, :] != 0, axis=(0, 2))
        if b is not None:
            biases = b.reshape(b.shape[0], 2, self.gates, hidden)[:, :, self.candidate]
            silent &= ~np.any(biases != 0, axis=(0, 1))
        for index in self.states:
            initial = state.view.input_constant(node, index)
            if state.view.has_input(node, index) and not _zero_fill(state.view, node, index):
                silent &= initial is not None and ~np.any(np.asarray(initial) != 0, axis=(0, 1))
        return silent

    def prune(self, node: gs.Node, state: ChannelState, cut: Cut) -> None:
        view = state.view
        w, r = view.input_constant(node, _W), view.input_constant(node, _R)
        directions, rows, _ = w.shape
        has_b = view.has_input(node, _B)
        b = view.input_constant(node, _B) if has_b else np.zeros((directions, 2 * rows), dtype=w.dtype)
        keep_in = cut.keep(node.inputs[_X])
        first_out = next((t for t in node.outputs if t.name), None)
        keep_out = cut.keep(first_out) if first_out is not None else None
        positions, constants = cut.removed_constants(node.inputs[_X])
        folded = len(positions) > 0
        if folded:
            b = b.astype(np.float64)
            b[:, :rows] += np.einsum("dgp,p->dg", w[:, :, positions], constants)
            b = b.astype(w.dtype)
        if keep_in is not None:
            w = w[:, :, keep_in]
        if keep_out is not None:
            w, b = _keep_units(w, keep_out, self.gates), _keep_units(b, keep_out, 2 * self.gates)
            r = _keep_units(r, keep_out, self.gates)[:, :, keep_out]
            node.attrs["hidden_size"] = int(keep_out.sum())
            for index in self.states:
                if view.has_input(node, index) and _zero_fill(view, node, index):
                    node.inputs[index] = gs.Variable.empty()  # an absent initial state is zero, of any size
                elif view.has_input(node, index):
                    view.replace_constant(node, index, view.input_constant(node, index)[:, :, keep_out])
            if view.has_input(node, _P):
                view.replace_constant(node, _P, _keep_units(view.input_constant(node, _P), keep_out, 3))
        if keep_in is None and keep_out is None and not folded:
            return
        view.replace_constant(node, _W, w)
        view.replace_constant(node, _R, r)
        if has_b or folded:
            _set_input(view, node, _B, b, "B")


def _zero_fill(view, node: gs.Node, index: int) -> bool:
    """Whether input `index` is a zero tensor of computed shape (torch exports the initial state of an RNN as
    ConstantOfShape(Concat(D, batch, H)) of 0): exactly what an absent initial state means."""
    producer = view.producer(node.inputs[index])
    if producer is None or producer.op != "ConstantOfShape":
        return False
    value = producer.attrs.get("value")
    return value is None or not np.any(np.asarray(value.values) != 0)


def _unit_rows(weight: np.ndarray, gates: int, hidden: int) -> np.ndarray:
    """[D, G*H, K] -> [H, D*G*K]: everything unit j owns in one row."""
    directions, _, k = weight.shape
    return weight.reshape(directions, gates, hidden, k).transpose(2, 0, 1, 3).reshape(hidden, -1)


def _keep_units(weight: np.ndarray, keep: np.ndarray, blocks: int) -> np.ndarray:
    """Keep the units `keep` (a mask over H) in each of the `blocks` blocks of H along axis 1 of
    [D, blocks*H, ...] (W and R: one block per gate; B: input and recurrent biases of every gate; P: 3)."""
    shaped = weight.reshape(weight.shape[0], blocks, len(keep), *weight.shape[2:])
    return shaped[:, :, keep].reshape(weight.shape[0], blocks * int(keep.sum()), *weight.shape[2:])


def _set_input(view, node: gs.Node, index: int, values: np.ndarray, hint: str) -> None:
    if index < len(node.inputs):
        view.replace_constant(node, index, values)
    else:
        view.append_constant(node, values, hint)


class LSTMHandler(RecurrentHandler):
    """LSTM: gates i, o, f, c; the cell state Y_c is a third output carrying the hidden units."""

    op_types = ("LSTM",)
    gates = 4
    candidate = 3
    states = (_H0, _C0)


class GRUHandler(RecurrentHandler):
    """GRU: gates z, r, h (either linear_before_reset: slicing rows is the same)."""

    op_types = ("GRU",)
    gates = 3
    candidate = 2


class RNNHandler(RecurrentHandler):
    """RNN: one gate, H_t = f(X·Wᵀ + H_{t-1}·Rᵀ + Wb + Rb)."""

    op_types = ("RNN",)
