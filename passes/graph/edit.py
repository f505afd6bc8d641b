"""The graph-edit layer: the verbs passes and the training export use to change a graph, on onnx-graphsurgeon.

An edit session works on its own copy of the model. Nodes and tensors are graphsurgeon objects (a tensor's
producer is `tensor.inputs`, its readers `tensor.outputs`), so rewiring keeps both directions in step; nothing
edits protobuf node lists by index. `to_model()` ends every session the same way: dead nodes and unread
initializers swept (`cleanup`), nodes put in dependency order (`toposort`), the model-level facts (opsets,
`sculpt.*` metadata) copied from the source.

    edit = GraphEdit(model)
    relu = edit.insert_after(edit.tensor("conv_out"), "Relu")          # every reader of conv_out now reads relu
    bias = edit.add_initializer(np.zeros(8, np.float32), "conv/bias")   # a fresh, unique name
    new_model = edit.to_model()
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optimizer.model import copy_model_fields


class GraphEdit:
    """An editable copy of `model`'s graph. The model passed in is never modified."""

    def __init__(self, model: onnx.ModelProto):
        self.source = model
        self.graph = gs.import_onnx(model)
        tensors = self.graph.tensors()
        self._used = set(tensors) | {n.name for n in self.graph.nodes if n.name}
        self._tensors = tensors

    # --- lookups -----------------------------------------------------------------------------------------------

    def tensor(self, name: str) -> gs.Tensor:
        """The tensor called `name` (KeyError when the graph has none)."""
        return self._tensors[name]

    def node(self, name: str) -> gs.Node:
        """The node called `name` (KeyError when the graph has none)."""
        found = next((n for n in self.graph.nodes if n.name == name), None)
        if found is None:
            raise KeyError(name)
        return found

    def fresh(self, hint: str) -> str:
        """A name no tensor or node of the graph uses yet: `hint`, else `hint_2`, `hint_3`, ..."""
        name, index = hint, 1
        while name in self._used:
            index += 1
            name = f"{hint}_{index}"
        self._used.add(name)
        return name

    # --- verbs -------------------------------------------------------------------------------------------------

    def add_initializer(self, values: np.ndarray, hint: str) -> gs.Constant:
        """A new constant (an initializer once exported) under a fresh name based on `hint`."""
        tensor = gs.Constant(self.fresh(hint), np.asarray(values, order="C"))
        self._tensors[tensor.name] = tensor
        return tensor

    def variable(self, hint: str, dtype=None, shape=None) -> gs.Variable:
        """A new activation tensor under a fresh name based on `hint`."""
        tensor = gs.Variable(self.fresh(hint), dtype=dtype, shape=shape)
        self._tensors[tensor.name] = tensor
        return tensor

    def add_node(self, op: str, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Tensor], *, hint: str,
                 attrs: dict | None = None, domain: str | None = None) -> gs.Node:
        """Append a node `op(inputs) -> outputs` named from `hint` (toposort places it)."""
        node = gs.Node(op, name=self.fresh(hint), attrs=dict(attrs or {}), inputs=list(inputs),
                       outputs=list(outputs), domain=domain)
        self.graph.nodes.append(node)
        return node

    def insert_after(self, tensor: gs.Tensor, op: str, extra_inputs: Sequence[gs.Tensor] = (), *,
                     attrs: dict | None = None, hint: str | None = None) -> gs.Node:
        """Put `op(tensor, *extra_inputs)` between `tensor` and every reader of it (graph outputs included: the
        new node writes the output's name, the old tensor is renamed)."""
        hint = hint or f"{tensor.name}/{op}"
        readers = list(tensor.outputs)
        if tensor in self.graph.outputs:
            moved = self.variable(f"{tensor.name}_before_{op}", dtype=tensor.dtype, shape=tensor.shape)
            producer = tensor.inputs[0]
            producer.outputs[producer.outputs.index(tensor)] = moved
            for reader in readers:
                reader.inputs[reader.inputs.index(tensor)] = moved
            return self.add_node(op, [moved, *extra_inputs], [tensor], hint=hint, attrs=attrs)
        output = self.variable(f"{tensor.name}_{op}", dtype=tensor.dtype)
        for reader in readers:
            for index, value in enumerate(reader.inputs):
                if value is tensor:
                    reader.inputs[index] = output
        return self.add_node(op, [tensor, *extra_inputs], [output], hint=hint, attrs=attrs)

    def insert_before(self, node: gs.Node, index: int, op: str, extra_inputs: Sequence[gs.Tensor] = (), *,
                      attrs: dict | None = None, hint: str | None = None) -> gs.Node:
        """Put `op(node.inputs[index], *extra_inputs)` on that one input of `node` (other readers keep the old
        tensor)."""
        source = node.inputs[index]
        output = self.variable(f"{source.name}_{op}", dtype=source.dtype)
        new = self.add_node(op, [source, *extra_inputs], [output], hint=hint or f"{source.name}/{op}", attrs=attrs)
        node.inputs[index] = output
        return new

    def replace_input(self, node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
        """`node` reads `new` wherever it read `old`."""
        for index, value in enumerate(node.inputs):
            if value is old:
                node.inputs[index] = new

    def replace_uses(self, old: gs.Tensor, new: gs.Tensor) -> None:
        """Every reader of `old` reads `new` instead (a graph output keeps `old`)."""
        for reader in list(old.outputs):
            self.replace_input(reader, old, new)

    def replace_node(self, node: gs.Node, op: str, inputs: Sequence[gs.Tensor], *, attrs: dict | None = None,
                     hint: str | None = None) -> gs.Node:
        """A new `op(inputs)` that writes `node`'s outputs; `node` is removed."""
        return self.replace_subgraph([node], lambda outputs: [
            self.add_node(op, inputs, outputs, hint=hint or node.name or op, attrs=attrs)])[0]

    def replace_subgraph(self, nodes: Sequence[gs.Node], build) -> list[gs.Node]:
        """Remove `nodes` and call `build(outputs)`, which adds the nodes that write the same output tensors
        (`outputs`: the removed nodes' outputs that anything outside still reads, in order). Returns the new
        nodes."""
        inside = {id(n) for n in nodes}
        outputs = [t for n in nodes for t in n.outputs
                   if t in self.graph.outputs or any(id(r) not in inside for r in t.outputs)]
        for node in nodes:
            node.inputs.clear()
            node.outputs.clear()
        return list(build(outputs))

    def remove_node(self, node: gs.Node, source: gs.Tensor) -> None:
        """Bypass `node`: the readers of its (single) output read `source` instead."""
        self.replace_uses(node.outputs[0], source)
        node.inputs.clear()
        node.outputs.clear()

    def constant_node_to_initializer(self, node: gs.Node, values: np.ndarray) -> gs.Constant:
        """Replace a node whose output is the constant `values` by an initializer of the same name."""
        output = node.outputs[0]
        constant = gs.Constant(output.name, np.asarray(values, order="C"))  # ascontiguousarray makes a 0-d value 1-d
        readers = list(output.outputs)
        is_output = output in self.graph.outputs
        node.inputs.clear()
        node.outputs.clear()
        for reader in readers:
            self.replace_input(reader, output, constant)
        if is_output:
            self.graph.outputs[self.graph.outputs.index(output)] = constant
        self._tensors[output.name] = constant
        return constant

    def replace_graph_input(self, old: gs.Variable, new: gs.Variable) -> None:
        """Put graph input `new` where `old` was (same position); `old` stops being an input."""
        self.graph.inputs[self.graph.inputs.index(old)] = new
        self._tensors[new.name] = new

    # --- export ------------------------------------------------------------------------------------------------

    def to_model(self) -> onnx.ModelProto:
        """The edited model: cleanup (dead nodes, unread initializers; graph inputs stay), toposort, export, and
        the source's opsets and metadata."""
        self.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        model = gs.export_onnx(self.graph, do_type_check=False)
        copy_model_fields(self.source, model)
        return model
