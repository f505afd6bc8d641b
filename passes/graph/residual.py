"""Residual blocks in an ONNX graph: `Add(x, f(x))` where the branch f depends on x alone.

A two-input `Add` (or `Sum`) of activations is an *identity residual block* when one input is a skip tensor x and
the other is the output of a branch: a set of nodes whose only outside input is x (constants aside), none of
whose tensors is read outside the branch (the Add excepted) or is a graph output, and whose result has x's shape,
so that `x + f(x)` can be replaced by x. Constant nodes that feed only the branch belong to it.

An Add that joins two activations but is not such a block is *declined* with the reason: the usual one is a
projection shortcut (both inputs are computed from a common tensor s, the skip side through a strided or
channel-changing Conv), which changes shape or channels and has no identity path to fall back to.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from optimizer.declines import Decline
from passes.graph.ir import GraphView

JOIN_OPS = ("Add", "Sum")


@dataclass
class ResidualBlock:
    """One identity residual block: `add` computes `skip + branch output`; `branch_index` is the branch's input."""

    add: gs.Node
    branch_index: int
    skip: str
    branch_output: str
    nodes: list[gs.Node]

    @property
    def name(self) -> str:
        return node_label(self.add)


def node_label(node: gs.Node) -> str:
    return node.name or f"{node.op}({node.outputs[0].name if node.outputs else '?'})"


def find_residual_blocks(view: GraphView) -> tuple[list[ResidualBlock], list[Decline]]:
    """Every identity residual block of the graph (in graph order), and a Decline for every other activation join
    (an Add of two activations that is not a removable identity residual block)."""
    order = {id(node): i for i, node in enumerate(view.graph.nodes)}
    blocks, declined = [], []
    for node in view.graph.nodes:
        if node.op not in JOIN_OPS:
            continue
        activations = [t for t in node.inputs if t.name and view.constant(t) is None]
        if len(activations) < 2:
            continue  # a bias or a constant offset, not a join of two paths
        if len(node.inputs) != 2:
            declined.append(Decline(node_label(node), node.op, "join-arity", f"{node.op} of {len(node.inputs)} "
                                    "inputs; only two-input joins are residual blocks"))
            continue
        if node.inputs[0] is node.inputs[1]:
            declined.append(Decline(node_label(node), node.op, "self-join", f"adds {node.inputs[0].name!r} to itself"))
            continue
        found = _identity_block(view, order, node)
        if isinstance(found, ResidualBlock):
            blocks.append(found)
        else:
            declined.append(found)
    return blocks, declined


def _identity_block(view: GraphView, order: dict[int, int], add: gs.Node) -> ResidualBlock | Decline:
    """The block with either input as the skip, or the Decline saying why neither works."""
    reasons = []
    for branch_index in (0, 1):
        out, skip = add.inputs[branch_index], add.inputs[1 - branch_index]
        nodes = branch_nodes(view, order, skip, out)
        if isinstance(nodes, list):
            problem = _leaks(view, nodes, add, out) or _shape_problem(view, skip, add.outputs[0])
            if problem is None:
                return ResidualBlock(add, branch_index, skip.name, out.name, _with_private_constants(view, nodes))
            nodes = problem
        reasons.append(f"with skip {skip.name!r}: {nodes}")
    projection = _projection_reason(view, order, add)
    if projection is not None:
        return Decline(node_label(add), add.op, "projection-shortcut", projection)
    return Decline(node_label(add), add.op, "not-identity",
                   "not an identity residual block (" + "; ".join(reasons) + ")")


def branch_nodes(view: GraphView, order: dict[int, int], source: gs.Tensor, out: gs.Tensor) -> list[gs.Node] | str:
    """The nodes computing `out` from `source` alone (constants aside), in graph order, or why there is no such set.

    Walks back from `out`'s producer and stops at `source`. A node placed before `source`'s producer in the
    (topologically sorted) graph cannot depend on it, so reaching one means the branch has another outside input.
    """
    if out is source:
        return f"{out.name!r} is the skip tensor itself"
    if not out.inputs:
        return f"{out.name!r} is a graph input, not computed from {source.name!r}"
    start = order[id(source.inputs[0])] if source.inputs else -1
    found: dict[int, gs.Node] = {}
    reads_source = False
    stack = [out.inputs[0]]
    while stack:
        node = stack.pop()
        if id(node) in found:
            continue
        found[id(node)] = node
        for tensor in node.inputs:
            if not tensor.name or view.constant(tensor) is not None:
                continue
            if tensor is source:
                reads_source = True
                continue
            if not tensor.inputs:
                return f"the branch also reads graph input {tensor.name!r}"
            producer = tensor.inputs[0]
            if order[id(producer)] <= start:
                return f"the branch also reads {tensor.name!r}, which does not depend on {source.name!r}"
            stack.append(producer)
    if not reads_source:
        return f"{out.name!r} does not depend on {source.name!r}"
    return sorted(found.values(), key=lambda n: order[id(n)])


def _leaks(view: GraphView, nodes: list[gs.Node], add: gs.Node, out: gs.Tensor) -> str | None:
    """Why the branch's tensors are needed outside it (so removing it would break the graph), or None."""
    inside = {id(n) for n in nodes}
    for node in nodes:
        for tensor in node.outputs:
            if view.is_graph_output(tensor):
                return f"branch tensor {tensor.name!r} is a graph output"
            if tensor.name in view.outer_scope_names:
                return f"branch tensor {tensor.name!r} is read inside an If/Loop/Scan body"
            for consumer in tensor.outputs:
                if id(consumer) not in inside and not (consumer is add and tensor is out):
                    return f"branch tensor {tensor.name!r} is also read by {node_label(consumer)!r} outside the block"
    return None


def _shape_problem(view: GraphView, skip: gs.Tensor, result: gs.Tensor) -> str | None:
    skip_shape, result_shape = view.shape(skip), view.shape(result)
    if skip_shape is None or result_shape is None or None in skip_shape or None in result_shape:
        return f"the shapes of {skip.name!r} and {result.name!r} are not known, so x + f(x) -> x may not keep it"
    if tuple(skip_shape) != tuple(result_shape):
        return f"the branch broadcasts the skip {list(skip_shape)} to {list(result_shape)}"
    return None


def _with_private_constants(view: GraphView, nodes: list[gs.Node]) -> list[gs.Node]:
    """Add the Constant nodes whose outputs only the branch reads: they go with it."""
    inside = {id(n) for n in nodes}
    extra = []
    for node in nodes:
        for tensor in node.inputs:
            producer = tensor.inputs[0] if tensor.inputs else None
            if (producer is not None and producer.op == "Constant" and id(producer) not in inside
                    and not view.is_graph_output(tensor)
                    and all(id(c) in inside for t in producer.outputs for c in t.outputs)):
                inside.add(id(producer))
                extra.append(producer)
    return extra + nodes


def _projection_reason(view: GraphView, order: dict[int, int], add: gs.Node) -> str | None:
    """When both inputs are closed branches from one common tensor s, name the shorter side as the shortcut."""
    first, second = _ancestors(view, add.inputs[0]), _ancestors(view, add.inputs[1])
    common = [tensor for name, tensor in first.items() if name in second]
    if not common:
        return None
    fork = max(common, key=lambda t: order[id(t.inputs[0])] if t.inputs else -1)
    sides = [branch_nodes(view, order, fork, t) for t in add.inputs]
    if not all(isinstance(side, list) for side in sides):
        return None
    shortcut = min(sides, key=len)
    ops = ", ".join(f"{n.op} {node_label(n)!r}" for n in shortcut if n.op != "Constant")
    before, after = view.shape(fork), view.shape(add.outputs[0])
    change = f"shape {list(before) if before else '?'} -> {list(after) if after else '?'}"
    return (f"projection shortcut: the skip path from {fork.name!r} runs {ops} ({change}), so the block has no "
            "identity path to fall back to")


def _ancestors(view: GraphView, tensor: gs.Tensor) -> dict[str, gs.Tensor]:
    """Every activation (non-constant tensor) `tensor` is computed from, itself included."""
    seen: dict[str, gs.Tensor] = {}
    stack = [tensor]
    while stack:
        current = stack.pop()
        if not current.name or current.name in seen or view.constant(current) is not None:
            continue
        seen[current.name] = current
        if current.inputs:
            stack.extend(current.inputs[0].inputs)
    return seen
