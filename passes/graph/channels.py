"""Channel spaces: which channel (atom) sits at each position of a tensor's channel axis, and which atoms are tied.

An *atom* is one output channel of one producer (Conv, ConvTranspose, Gemm, MatMul with a constant weight).
Every tensor the channels flow into carries a `Space`: the axis they sit on and, per position along that axis,
the atom found there (`OPAQUE` where the channel has no prunable origin, e.g. it came from a graph input).
Ops that force channels to be removed together (a residual `Add`, a depthwise Conv, a channel shuffle) *tie*
atoms in a union-find; ops that cannot follow a channel *block* it with a `Decline`. A *unit* is one class of
the union-find: the smallest set of channels that can be removed, and removing it removes every position
where one of its atoms appears.

Each space also carries `values`: the channel's value when it is the same constant at every position of the
tensor (NaN when it varies). A channel whose producer rows are all zero carries its bias; one multiplied by
zero carries 0. These constants decide when a removal is exact (see `groups.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.declines import Decline
from passes.graph.ir import GraphView

OPAQUE = -1


@dataclass
class Space:
    """The channels along `axis` of one tensor: `ids[i]` is the atom at position i, `values[i]` its constant."""

    axis: int
    ids: np.ndarray
    values: np.ndarray

    @classmethod
    def opaque(cls, axis: int, size: int) -> Space:
        return cls(axis, np.full(size, OPAQUE, dtype=np.int64), np.full(size, np.nan))

    def __len__(self) -> int:
        return len(self.ids)

    def moved(self, axis: int) -> Space:
        return Space(axis, self.ids, self.values)

    def with_values(self, values: np.ndarray) -> Space:
        return Space(self.axis, self.ids, np.asarray(values, dtype=np.float64))

    def take(self, positions: np.ndarray | slice) -> Space:
        return Space(self.axis, self.ids[positions], self.values[positions])


@dataclass
class Source:
    """A producer output that created atoms: the node, its output tensor and the axis the channels sit on."""

    node: str
    op: str
    tensor: str
    axis: int
    first_atom: int
    count: int


class Atoms:
    """Union-find over atoms, with the reasons that block each class."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self.origin: list[tuple[int, int]] = []  # atom -> (source index, position in the source)
        self._blocked: dict[int, list[Decline]] = {}
        self._frozen: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._parent)

    def new(self, source_index: int, count: int) -> np.ndarray:
        first = len(self._parent)
        self._parent.extend(range(first, first + count))
        self.origin.extend((source_index, i) for i in range(count))
        return np.arange(first, first + count, dtype=np.int64)

    def find(self, atom: int) -> int:
        parent = self._parent
        root = atom
        while parent[root] != root:
            root = parent[root]
        while parent[atom] != root:
            parent[atom], atom = root, parent[atom]
        return root

    def roots(self, ids: np.ndarray) -> np.ndarray:
        """`find` of every id; OPAQUE stays OPAQUE. After `freeze`, a table lookup."""
        if self._frozen is not None:
            return np.where(ids == OPAQUE, OPAQUE, self._frozen[np.maximum(ids, 0)])
        return np.array([self.find(int(a)) if a != OPAQUE else OPAQUE for a in ids], dtype=np.int64)

    def freeze(self) -> np.ndarray:
        """End of the sweep: no more unions; every atom's root, also kept for fast `roots` lookups."""
        self._frozen = np.array([self.find(a) for a in range(len(self._parent))], dtype=np.int64)
        return self._frozen

    def union(self, a: int, b: int) -> None:
        if self._frozen is not None:
            raise RuntimeError("atoms are frozen: the sweep is over")
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self._parent[rb] = ra
        if rb in self._blocked:
            self._blocked.setdefault(ra, []).extend(self._blocked.pop(rb))

    def block(self, atom: int, reason: Decline) -> None:
        reasons = self._blocked.setdefault(self.find(atom), [])
        if reason not in reasons:
            reasons.append(reason)

    def reasons(self, atom: int) -> list[Decline]:
        return self._blocked.get(self.find(atom), [])


@dataclass
class ProducerSlices:
    """Weights that create channels: position p of `tensor`'s space owns `np.take(weight, p, axis)`."""

    node: str
    tensor: str
    weight: np.ndarray
    axis: int


@dataclass
class ConsumerTerm:
    """Where channels are reduced into other channels (a Conv's input, a Gemm's K axis...).

    `silent[p]`: position p contributes nothing whatever its value (its weight slice is all zero).
    `absorbs`: a channel that is one constant everywhere can be folded into the node's bias exactly.
    """

    node: str
    tensor: str
    silent: np.ndarray
    absorbs: bool


@dataclass
class NormScales:
    """Per-position scale of a normalization (|gamma|), for the bn-scale criterion."""

    node: str
    tensor: str
    scales: np.ndarray


@dataclass(frozen=True)
class Member:
    """A (node, tensor, axis) touched by a channel space, and what the node does with it."""

    node: str
    tensor: str
    axis: int
    role: str  # produces | consumes | ties | slices | passes


@dataclass
class ChannelState:
    """Everything the sweep over the graph learns: spaces, atoms, ties, blocks, weights and members."""

    view: GraphView
    atoms: Atoms = field(default_factory=Atoms)
    spaces: dict[str, Space] = field(default_factory=dict)
    sources: list[Source] = field(default_factory=list)
    producers: list[ProducerSlices] = field(default_factory=list)
    consumers: list[ConsumerTerm] = field(default_factory=list)
    norms: list[NormScales] = field(default_factory=list)
    members: list[Member] = field(default_factory=list)
    alternate: frozenset[str] = frozenset()  # first outputs of the nodes in their alternate layout (Handler.reconsider)

    def space(self, tensor: gs.Tensor | None) -> Space | None:
        if tensor is None or not tensor.name:
            return None
        return self.spaces.get(tensor.name)

    def in_alternate(self, node: gs.Node) -> bool:
        """Whether this sweep analyses `node` in its handler's alternate layout."""
        return bool(node.outputs) and node.outputs[0].name in self.alternate

    def set_space(self, node: gs.Node, tensor: gs.Tensor, space: Space, role: str = "passes") -> None:
        self.spaces[tensor.name] = space
        self.members.append(Member(node.name, tensor.name, space.axis, role))
        if tensor.name in self.view.outer_scope_names:
            self.block(space.ids, Decline(tensor.name, "tensor", "control-flow", "read inside an If/Loop/Scan body"))

    def member(self, node: gs.Node, tensor: gs.Tensor, role: str) -> None:
        space = self.space(tensor)
        if space is not None:
            self.members.append(Member(node.name, tensor.name, space.axis, role))

    def produce(
        self,
        node: gs.Node,
        tensor: gs.Tensor,
        axis: int,
        count: int,
        values: np.ndarray | None = None,
        weight: np.ndarray | None = None,
        weight_axis: int = 0,
    ) -> Space:
        """Create `count` fresh atoms for the channels `node` writes along `axis` of `tensor`."""
        source = Source(node.name, node.op, tensor.name, axis, len(self.atoms), count)
        self.sources.append(source)
        ids = self.atoms.new(len(self.sources) - 1, count)
        vals = np.full(count, np.nan) if values is None else np.asarray(values, dtype=np.float64)
        space = Space(axis, ids, vals)
        self.set_space(node, tensor, space, role="produces")
        if weight is not None:
            self.producers.append(ProducerSlices(node.name, tensor.name, weight, weight_axis))
        return space

    def tie(self, a: np.ndarray, b: np.ndarray, node: gs.Node, why: str) -> None:
        """Tie atoms position by position; an atom tied to an OPAQUE position is blocked."""
        opaque = Decline(node.name, node.op, "no-prunable-origin",
                         f"{why}, and some of them have no prunable origin (a graph input or an unsupported op)")
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            if x == OPAQUE and y == OPAQUE:
                continue
            if x == OPAQUE or y == OPAQUE:
                self.atoms.block(y if x == OPAQUE else x, opaque)
            else:
                self.atoms.union(x, y)

    def tie_all(self, ids: np.ndarray, node: gs.Node, why: str) -> None:
        """Tie every atom in `ids` into one unit (blocked if any position is OPAQUE)."""
        flat = ids.ravel()
        self.tie(np.full_like(flat, flat[0]), flat, node, why)

    def block(self, ids: np.ndarray, reason: Decline) -> None:
        for atom in np.unique(ids):
            if atom != OPAQUE:
                self.atoms.block(int(atom), reason)

    def block_node(self, node: gs.Node, why: str, indices: list[int] | None = None, *,
                   code: str = "channel-blocked") -> None:
        """Block the channels of the node's inputs (all, or those at `indices`) with one Decline."""
        reason = Decline(node.name, node.op, code, why)
        for i, tensor in enumerate(node.inputs):
            space = self.space(tensor)
            if space is not None and (indices is None or i in indices):
                self.block(space.ids, reason)
