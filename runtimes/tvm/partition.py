"""Models with ops TVM's ONNX frontend lacks (LSTM, GRU, RNN, If, Loop, Scan...): split the graph and run the
unsupported parts on ONNX Runtime.

The top-level nodes, in their (topological) order, are cut into maximal runs of one kind: `tvm` (every op
importable) or `ort` (the rest). Each run becomes a standalone model over the tensors it reads from earlier
runs or the graph inputs, and it writes the tensors later runs or the graph outputs read. A `tvm` run is
compiled with the exact shapes of the tensors that reach it (built at the first run, per input signature,
through TvmSession and so through the compile cache):

    Conv -> Relu -> Transpose | GRU | Squeeze -> MatMul -> Add
    `--------- tvm ---------´ `ort´ `--------- tvm --------´

`describe()` lists the runs and, for every `ort` run, the ops that put it there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from optimizer.data import feed_in_chunks, fixed_batch, graph_inputs
from optimizer.errors import RuntimeFailure

CONTROL_FLOW = {"If", "Loop", "Scan"}


def unsupported_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Top-level nodes TVM's ONNX importer cannot convert (control flow included: its bodies are not imported)."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"Constant"}
    return [n for n in model.graph.node
            if n.domain not in ("", "ai.onnx") or n.op_type not in known or n.op_type in CONTROL_FLOW]


@dataclass
class Run:
    """Consecutive nodes of one kind, with the tensors they read from outside and the tensors they hand on."""

    kind: str  # tvm | ort
    nodes: list[onnx.NodeProto]
    inputs: list[str]
    outputs: list[str]
    sessions: dict[tuple, object] = field(default_factory=dict)  # input signature -> session

    def ops(self) -> list[str]:
        return sorted({n.op_type for n in self.nodes})


def split(model: onnx.ModelProto, unsupported: list[onnx.NodeProto]) -> list[Run]:
    """The runs of `model`'s nodes; `unsupported` (from unsupported_nodes) go to ONNX Runtime."""
    ort_ids = {id(n) for n in unsupported}
    groups: list[tuple[str, list[onnx.NodeProto]]] = []
    for node in model.graph.node:
        kind = "ort" if id(node) in ort_ids else "tvm"
        if groups and groups[-1][0] == kind:
            groups[-1][1].append(node)
        else:
            groups.append((kind, [node]))
    constants = {t.name for t in model.graph.initializer} - {i.name for i in model.graph.input}
    later_reads = [set() for _ in groups]
    needed = {o.name for o in model.graph.output}
    for index in range(len(groups) - 1, -1, -1):
        later_reads[index] = set(needed)
        for node in groups[index][1]:
            needed |= consumed(node)
    runs = []
    for (kind, nodes), after in zip(groups, later_reads, strict=True):
        produced = [o for n in nodes for o in n.output if o]
        inside = set(produced)
        reads = [name for n in nodes for name in sorted(consumed(n))]
        inputs = list(dict.fromkeys(r for r in reads if r not in inside and r not in constants))
        outputs = [o for o in produced if o in after]
        runs.append(Run(kind, nodes, inputs, outputs))
    return runs


def consumed(node: onnx.NodeProto) -> set[str]:
    """Inputs of a node, including the names its subgraphs take from the enclosing scope."""
    names = {i for i in node.input if i}
    for attribute in node.attribute:
        bodies = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        for body in bodies:
            local = {o for n in body.node for o in n.output} | {i.name for i in body.input}
            local |= {t.name for t in body.initializer}
            for inner in body.node:
                names |= {name for name in consumed(inner) if name not in local}
    return names


def run_model(model: onnx.ModelProto, run: Run, env: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The standalone model of one run, its inputs typed and shaped as the arrays that reach it."""
    used = set().union(*(consumed(n) for n in run.nodes))
    inputs = [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(env[name].dtype),
                                                 list(env[name].shape)) for name in run.inputs]
    graph = onnx.helper.make_graph(
        run.nodes, f"{run.kind}_run", inputs, [onnx.helper.make_empty_tensor_value_info(n) for n in run.outputs],
        initializer=[t for t in model.graph.initializer if t.name in used and t.name not in run.inputs],
    )
    part = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                                  functions=model.functions)
    if run.kind == "tvm":  # the tvm importer wants typed outputs: infer them from the static input shapes
        part = onnx.shape_inference.infer_shapes(part, data_prop=True)
        known = {v.name: v for v in [*part.graph.value_info, *part.graph.output] if v.type.tensor_type.elem_type}
        missing = [n for n in run.outputs if n not in known]
        if missing:
            raise RuntimeFailure(f"tvm runtime: the type of tensor {missing[0]!r} (between TVM and ONNX Runtime "
                                 "parts of the model) cannot be inferred; run this model with --runtime ort")
        del part.graph.output[:]
        part.graph.output.extend(known[n] for n in run.outputs)
    return part


class PartitionedSession:
    """A model on the tvm runtime whose unsupported ops run on ONNX Runtime (see the module docstring)."""

    def __init__(self, model: onnx.ModelProto, options, unsupported: list[onnx.NodeProto]):
        self.model, self.options = model, options
        self.runs = split(model, unsupported)
        self.output_names = [o.name for o in model.graph.output]
        self.batch = fixed_batch(graph_inputs(model))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name; more samples than a fixed batch are fed in chunks (optimizer.data.feed_in_chunks)."""
        return feed_in_chunks(self._run_once, feeds, self.batch)

    def _run_once(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env = dict(feeds)
        for run in self.runs:
            if not run.outputs:
                continue
            arrays = {name: np.asarray(env[name]) for name in run.inputs}
            signature = tuple((name, a.shape, str(a.dtype)) for name, a in arrays.items())
            if signature not in run.sessions:
                run.sessions[signature] = self._session(run, arrays)
            env.update(run.sessions[signature].run(arrays))
        return {name: env[name] for name in self.output_names}

    def _session(self, run: Run, arrays: dict[str, np.ndarray]):
        part = run_model(self.model, run, arrays)
        if run.kind == "ort":
            from runtimes.ort import OrtSession

            try:
                return OrtSession(part, threads=self.options.threads)
            except RuntimeFailure as e:
                node = run.nodes[0]
                op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
                raise RuntimeFailure(
                    f"tvm runtime: TVM cannot import op {op!r} (node {node.name or node.output[0]!r}) and ONNX Runtime "
                    f"cannot run it either ({e}); rewrite that node into standard ONNX ops"
                ) from e
        from runtimes.tvm.session import TvmSession

        return TvmSession(part, self.options)

    def describe(self) -> dict:
        runs = []
        for run in self.runs:
            row = {"runtime": run.kind, "nodes": len(run.nodes), "ops": run.ops()}
            sessions = list(run.sessions.values())
            if run.kind == "tvm" and sessions:
                facts = sessions[-1].describe()
                row.update({k: facts[k] for k in ("compiled", "compile_seconds", "cache_hit", "layers") if k in facts})
            runs.append(row)
        fallback = sorted({op for run in self.runs if run.kind == "ort" for op in run.ops()})
        return {"partitioned": True, "onnxruntime_ops": fallback, "runs": runs, "threads": self.options.threads}
