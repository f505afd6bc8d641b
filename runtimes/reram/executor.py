"""Running an ONNX model with its crossbar layers emulated and everything else evaluated digitally.

The graph is rewritten once: each mapped node becomes one `sculpt.reram::CrossbarLayer` node that consumes the
activation (or, for QDQ models, the integer codes feeding its DequantizeLinear) and produces the node's output;
DequantizeLinear nodes left without consumers are dropped. The digital ops between crossbar layers run on ONNX
Runtime, one session per level of the graph (onnx.reference lacks kernels for some older opsets, e.g.
DequantizeLinear before opset 19, and is slow for pooling).
"""

from __future__ import annotations

import numpy as np
import onnx

from optimizer.data import graph_inputs
from optimizer.errors import RuntimeFailure, first_line
from optimizer.ort_session import ort_session
from runtimes.reram.config import ReramOptions
from runtimes.reram.crossbar import Counts, Crossbar
from runtimes.reram.layers import LayerSpec
from runtimes.reram.mapping import im2col

DOMAIN = "sculpt.reram"


class Layer:
    """A mapped layer: its spec, one Crossbar per conv group, and the events counted since the last reset."""

    def __init__(self, spec: LayerSpec, options: ReramOptions, seed_index: int, weight_bits: int):
        self.spec = spec
        self.options = options
        self.crossbars = [
            Crossbar(w, options, np.random.default_rng([options.seed, 0, seed_index, g]), weight_bits=weight_bits)
            for g, w in enumerate(spec.weights)
        ]
        self.column_sums = np.concatenate([w.sum(axis=0) for w in spec.weights]).astype(np.float64)
        self.reset_counts()
        self.adc_bits: tuple[int, ...] = ()
        self.adc_bits_source = ""
        self.observed_max: np.ndarray | None = None

    @property
    def slices(self) -> int:
        return self.crossbars[0].slices

    def reset_counts(self) -> None:
        zeros = np.zeros(self.slices, dtype=np.int64)
        self.counts = Counts(conversions=zeros, saturated=zeros.copy())

    def configure_adc(self, bits: tuple[int, ...], source: str) -> None:
        self.adc_bits, self.adc_bits_source = bits, source
        observed = list(self.observed_max) if self.observed_max is not None else [0.0] * self.slices
        for xbar in self.crossbars:
            xbar.configure_adc(bits, self.options.adc_range, observed)

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, int, int]:
        """(unsigned input codes, code of real zero, input bits)."""
        coding = self.spec.input
        if coding.from_float:
            bits = self.options.activation_bits
            codes = np.rint(x.astype(np.float64) / coding.scale) + coding.zero_point
            return np.clip(codes, 0, (1 << bits) - 1).astype(np.int32), coding.zero_point, bits
        if not np.issubdtype(x.dtype, np.integer) or x.dtype.itemsize > 2:
            raise RuntimeFailure(f"layer {self.spec.name}: input codes of type {x.dtype} are not supported; "
                                 "crossbars take 8- or 16-bit integer activations")
        bits = 8 * x.dtype.itemsize
        offset = 1 << (bits - 1) if np.issubdtype(x.dtype, np.signedinteger) else 0
        return x.astype(np.int32) + offset, coding.zero_point + offset, bits

    def forward(self, x: np.ndarray, rng: np.random.Generator, observe: bool = False) -> np.ndarray:
        u, zero, bits = self.encode(x)
        spec = self.spec
        dtype = x.dtype if spec.input.from_float else spec.output.dtype
        if spec.conv is not None:
            per_group = u.shape[1] // spec.conv.groups
            results = []
            for g, xbar in enumerate(self.crossbars):
                patches, out = im2col(u[:, g * per_group : (g + 1) * per_group], spec.conv, zero)
                results.append(self._multiply(xbar, patches, bits, zero, rng, observe))
            acc = np.concatenate(results, axis=1)
            y = self._finish(acc, zero, dtype)
            return np.moveaxis(y.reshape(u.shape[0], *out, spec.m), -1, 1)
        if spec.op_type == "Gemm":
            matrix = u.T if spec.trans_a else u
            return self._finish(self._multiply(self.crossbars[0], matrix, bits, zero, rng, observe), zero, dtype)
        lead = u.shape[:-1]
        acc = self._multiply(self.crossbars[0], u.reshape(-1, u.shape[-1]), bits, zero, rng, observe)
        return self._finish(acc, zero, dtype).reshape(*lead, spec.m)

    def _multiply(self, xbar: Crossbar, u: np.ndarray, bits: int, zero: int, rng, observe: bool) -> np.ndarray:
        if observe:
            largest = xbar.observe(u, bits)
            self.observed_max = largest if self.observed_max is None else np.maximum(self.observed_max, largest)
        acc, counts = xbar.matmul(u, bits, rng)
        if zero:
            counts.digital_adds += acc.size
        self.counts.add(counts)
        return acc

    def _finish(self, acc: np.ndarray, zero: int, dtype: np.dtype) -> np.ndarray:
        """The node's output from the accumulator: zero-point correction, scales and bias, requantization."""
        spec = self.spec
        centered = acc - zero * self.column_sums
        if spec.output.kind == "int32":
            return centered.astype(np.int32)
        y = centered * (spec.input.scale * spec.alpha * spec.weight_scale)
        if spec.bias is not None:
            y = y + spec.bias
        if spec.output.kind == "requantize":
            info = np.iinfo(spec.output.dtype)
            q = np.rint(y / spec.output.y_scale) + spec.output.y_zero_point
            return np.clip(q, info.min, info.max).astype(spec.output.dtype)
        return y.astype(dtype)


def rewrite(model: onnx.ModelProto, layers: list[LayerSpec]) -> list[onnx.NodeProto]:
    """The graph's nodes with every mapped node replaced by a CrossbarLayer node, unneeded nodes dropped."""
    by_output = {layer.output_name: index for index, layer in enumerate(layers)}
    nodes = []
    for node in model.graph.node:
        index = by_output.get(node.output[0]) if node.output else None
        if index is None:
            nodes.append(node)
            continue
        nodes.append(onnx.helper.make_node("CrossbarLayer", [layers[index].input_name], [node.output[0]],
                                           name=layers[index].name, domain=DOMAIN, layer=index))
    needed = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(_consumed(node))
    return list(reversed(kept))


def _consumed(node: onnx.NodeProto) -> set[str]:
    """Inputs of a node, including names its subgraphs take from the enclosing scope."""
    names = {i for i in node.input if i}
    for attr in node.attribute:
        for graph in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            inner_outputs = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
            inner_outputs |= {t.name for t in graph.initializer}
            for inner in graph.node:
                names.update(n for n in _consumed(inner) if n not in inner_outputs)
    return names


class Segment:
    """Consecutive digital nodes run by one ONNX Runtime session, built at the first run from the input dtypes."""

    def __init__(self, model: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: list[str], outputs: list[str],
                 threads: int | None):
        self.model, self.nodes, self.inputs, self.outputs, self.threads = model, nodes, inputs, outputs, threads
        self._sessions: dict[tuple, object] = {}

    def run(self, env: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: env[name] for name in self.inputs}
        key = tuple(str(v.dtype) for v in feeds.values())
        if key not in self._sessions:
            self._sessions[key] = self._session(feeds)
        try:
            values = self._sessions[key].run(self.outputs, feeds)
        except Exception as e:  # onnxruntime raises its own exception types
            raise RuntimeFailure(f"runtime reram: digital ops {self._names()} failed: {first_line(e)}") from e
        return dict(zip(self.outputs, values, strict=True))

    def _session(self, feeds: dict[str, np.ndarray]):

        used = set().union(*(_consumed(n) for n in self.nodes))
        graph = onnx.helper.make_graph(
            self.nodes, "digital",
            [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), None)
             for n, v in feeds.items()],
            [onnx.helper.make_empty_tensor_value_info(n) for n in self.outputs],
            initializer=[t for t in self.model.graph.initializer if t.name in used and t.name not in feeds],
        )
        opsets = [o for o in self.model.opset_import if o.domain != DOMAIN]
        model = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=self.model.ir_version,
                                       functions=self.model.functions)
        return ort_session(model, self.threads, what=f"the digital ops {self._names()} (runtime reram)")

    def _names(self) -> str:
        names = [n.name or n.op_type for n in self.nodes]
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


class Executor:
    """Runs the rewritten graph level by level: digital ops of level L (one ORT session), then the crossbar layers
    fed by level L, whose outputs are level L + 1. Every tensor is computed before it is needed because a node's
    level is the highest level among its inputs."""

    def __init__(self, model: onnx.ModelProto, nodes: list[onnx.NodeProto], layers: list[Layer],
                 read_rng: np.random.Generator):
        self.layers = layers
        self.read_rng = read_rng
        initializers = {t.name for t in model.graph.initializer}
        self.input_names = [i.name for i in graph_inputs(model)]
        self.output_names = [o.name for o in model.graph.output]
        level = dict.fromkeys([*self.input_names, *initializers], 0)
        digital: dict[int, list[onnx.NodeProto]] = {}
        self.crossbar_steps: dict[int, list[onnx.NodeProto]] = {}
        for node in nodes:
            node_level = max((level.get(i, 0) for i in _consumed(node)), default=0)
            if node.domain == DOMAIN:
                self.crossbar_steps.setdefault(node_level, []).append(node)
                level[node.output[0]] = node_level + 1
            else:
                digital.setdefault(node_level, []).append(node)
                level.update(dict.fromkeys(node.output, node_level))
        later_needs = self._needs_after(nodes, level)
        self.segments: dict[int, Segment] = {}
        for lvl, members in digital.items():
            produced = {o for n in members for o in n.output if o}
            inputs = sorted({i for n in members for i in _consumed(n)} - produced - initializers)
            outputs = [o for n in members for o in n.output if o in later_needs.get(lvl, set())]
            self.segments[lvl] = Segment(model, members, inputs, outputs, layers[0].options.threads if layers else None)
        self.levels = sorted(set(digital) | set(self.crossbar_steps))
        self.constants = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
                          if t.name in set(self.output_names)}

    def _needs_after(self, nodes: list[onnx.NodeProto], level: dict[str, int]) -> dict[int, set[str]]:
        """Per level, the tensors it produces that crossbars, other levels or the graph outputs consume."""
        needs: dict[int, set[str]] = {}
        for name in self.output_names:
            needs.setdefault(level.get(name, 0), set()).add(name)
        for node in nodes:
            for name in _consumed(node):
                if name in level:
                    producer_level = level[name]
                    node_level = max((level.get(i, 0) for i in _consumed(node)), default=0)
                    if node.domain == DOMAIN or node_level != producer_level:
                        needs.setdefault(producer_level, set()).add(name)
        return needs

    def run(self, feeds: dict[str, np.ndarray], observe: bool = False) -> dict[str, np.ndarray]:
        missing = [name for name in self.input_names if name not in feeds]
        if missing:
            raise RuntimeFailure(f"runtime reram: missing input {missing[0]!r}; the model takes "
                                 f"{', '.join(self.input_names)}")
        env = {name: feeds[name] for name in self.input_names}
        env.update(self.constants)
        for lvl in self.levels:
            if lvl in self.segments:
                env.update(self.segments[lvl].run(env))
            for node in self.crossbar_steps.get(lvl, []):
                index = onnx.helper.get_attribute_value(node.attribute[0])
                env[node.output[0]] = self.layers[index].forward(env[node.input[0]], self.read_rng, observe)
        return {name: env[name] for name in self.output_names}



def chunks(feeds: dict[str, np.ndarray], size: int):
    n = next(iter(feeds.values())).shape[0]
    for start in range(0, n, size):
        yield {k: v[start : start + size] for k, v in feeds.items()}
