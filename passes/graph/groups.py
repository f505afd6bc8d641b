"""Channel groups: the analysis of a whole graph, what each group holds, whether and how exactly it can shrink.

    group := the producers whose channels are tied together, plus every (node, tensor, axis) their channels
             reach, split into units: unit i = the channels that must be removed together.

For `Conv(3->4) -> Relu -> Conv(4->8)` there is one prunable group (the first Conv's outputs):

    group0 := producers [conv1], units [0, 1, 2, 3]
      members: (conv1, y1, axis 1, produces) (relu, r1, axis 1, passes) (conv2, r1, axis 1, consumes)
      unit 2 removed -> conv1.W[2], conv1.B[2] and conv2.W[:, 2] go, r1 has 3 channels.

conv2's 8 output channels reach the graph output, so its group is kept with that reason. A residual
`Add(conv_a, conv_b)` makes one group of both producers whose unit i is {conv_a channel i, conv_b channel i}.

A unit is *exact* (removable without changing any output) when every consumer that reduces it either has an
all-zero weight slice for it, or receives it as 0, or receives it as one constant it can fold into its bias.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import onnx

from optimizer.declines import Decline
from passes.graph.channels import OPAQUE, ChannelState, Member, Source
from passes.graph.handlers import handler_for
from passes.graph.ir import GraphView


@dataclass
class Group:
    """One group: its producers, its units (each a union-find root, in canonical order) and its members.

    `blocked[i]` lists why unit i cannot be removed ([] when it can); `exact[i]` says whether removing unit i
    provably leaves every output unchanged.
    """

    id: int
    sources: list[Source]
    roots: np.ndarray
    blocked: list[list[Decline]]
    exact: np.ndarray
    members: list[Member] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.sources[0].node

    @property
    def producers(self) -> list[str]:
        return [s.node for s in self.sources]

    @property
    def channels(self) -> int:
        return len(self.roots)

    @property
    def prunable(self) -> np.ndarray:
        return np.array([not reasons for reasons in self.blocked], dtype=bool)

    def reasons(self) -> list[Decline]:
        seen: list[Decline] = []
        for reasons in self.blocked:
            seen.extend(r for r in reasons if r not in seen)
        return seen


@dataclass
class Analysis:
    """The result of `analyze`: the view it ran on, the sweep's state and the groups."""

    view: GraphView
    state: ChannelState
    groups: list[Group]
    fingerprint: str  # of the graph as analysed, before any removal edits the view

    def root_ids(self, ids: np.ndarray) -> np.ndarray:
        return self.state.atoms.roots(ids)


def analyze(model: onnx.ModelProto) -> Analysis:
    """Run every node's handler in topological order, block what reaches a graph output, build the groups.

    A handler may ask for a second sweep with its node in an alternate layout (`Handler.reconsider`: a grouped
    Conv whose whole-group units all merged is then pruned channel by channel); one more sweep settles it.
    """
    view = GraphView(model)
    state = _sweep(view, frozenset())
    alternate = frozenset(n.outputs[0].name for n in view.nodes
                          if n.outputs and handler_for(n, view.opset).reconsider(n, state))
    if alternate:
        state = _sweep(view, alternate)
    return Analysis(view, state, _build_groups(state), structure_fingerprint(view))


def _sweep(view: GraphView, alternate: frozenset[str]) -> ChannelState:
    state = ChannelState(view, alternate=alternate)
    for node in view.nodes:
        handler = handler_for(node, view.opset)
        try:
            handler.propagate(node, state)
        except Exception as error:  # a handler bug must cost this node its channels, never the whole run
            state.block_node(node, f"the channel analysis failed here ({type(error).__name__}: {error})",
                             code="analysis-failed")
    for tensor in view.graph.outputs:
        space = state.space(tensor)
        if space is not None:
            output = Decline(tensor.name, "graph output", "graph-output", "a graph output keeps its shape")
            state.block(space.ids, output)
    return state


def _build_groups(state: ChannelState) -> list[Group]:
    atoms = state.atoms
    if not len(atoms):
        return []
    roots = atoms.freeze()
    source_of = np.array([source for source, _ in atoms.origin], dtype=np.int64)
    component = list(range(len(state.sources)))

    def find(i: int) -> int:
        while component[i] != i:
            component[i] = component[component[i]]
            i = component[i]
        return i

    for atom, root in enumerate(roots):
        a, b = find(int(source_of[atom])), find(int(source_of[root]))
        if a != b:
            component[max(a, b)] = min(a, b)
    exact_fail = _inexact_roots(state, roots)
    by_component: dict[int, list[int]] = {}
    for root in np.unique(roots):  # roots are the smallest atom of their class: sorted = canonical order
        by_component.setdefault(find(int(source_of[root])), []).append(int(root))
    groups = []
    for index, (first_source, unit_roots) in enumerate(sorted(by_component.items())):
        sources = [s for i, s in enumerate(state.sources) if find(i) == first_source]
        blocked = [list(atoms.reasons(r)) for r in unit_roots]
        exact = np.array([not blocked[i] and r not in exact_fail for i, r in enumerate(unit_roots)], dtype=bool)
        groups.append(Group(index, sources, np.array(unit_roots, dtype=np.int64), blocked, exact))
    _attach_members(state, roots, groups)
    return groups


def _inexact_roots(state: ChannelState, roots: np.ndarray) -> set[int]:
    """Roots with a consumer position where removal would change the consumer's output."""
    failing: set[int] = set()
    for term in state.consumers:
        space = state.spaces[term.tensor]
        tracked = space.ids != OPAQUE
        values = space.values
        ok = term.silent | (values == 0) | (np.isfinite(values) & term.absorbs)
        failing.update(int(r) for r in roots[space.ids[tracked & ~ok]])
    return failing


def _attach_members(state: ChannelState, roots: np.ndarray, groups: list[Group]) -> None:
    group_of_root = {int(r): g.id for g in groups for r in g.roots}
    seen: set[tuple[int, Member]] = set()
    for member in state.members:
        ids = state.spaces[member.tensor].ids
        for group_id in {group_of_root[int(roots[a])] for a in np.unique(ids) if a != OPAQUE}:
            if (group_id, member) not in seen:
                seen.add((group_id, member))
                groups[group_id].members.append(member)


def structure_fingerprint(view: GraphView) -> str:
    """A hash of the graph's structure (op types in order, weight shapes, I/O shapes), not of names or values.

    A re-export of the same architecture gets the same fingerprint; another architecture does not.
    """
    parts = [repr([view.shape(t) for t in view.graph.inputs + view.graph.outputs])]
    for node in view.nodes:
        shapes = [view.shape(t) if view.constant(t) is not None else "x" for t in node.inputs]
        parts.append(f"{node.op}:{shapes}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
