"""CLI fuzzing: mutate tiny models, run one `optimize` command in-process, and judge how it ended.

Shared by the hypothesis test in CI (tests/test_fuzz_cli.py, a few hundred cases) and the long run
(`python -m tests.fuzz_long --cases 5000`, not in CI). A case is (seed model, mutation, mutation seed, command).
Its verdict holds the exit code and every broken promise: a traceback, an "internal error", more or less than
one error line on failure, an output left behind by a failed command (or a temporary file), an output of a
successful command that does not load, or an input whose bytes changed.

    >>> verdict = run_case(Case("mlp", "flip_bytes", 3, "cleanup"))
    >>> verdict.code, verdict.problems
    (2, [])
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

COMMANDS = ("inspect", "cleanup", "structured-sparse", "quantize", "run")


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 12)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(12).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((12, 5)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu1"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _convnet() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "cw"),
             numpy_helper.from_array(rng.random(4).astype(np.float32) + 0.5, "gamma"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.random(4).astype(np.float32) + 0.5, "var"),
             numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "fw"),
             numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "fb")]
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "convnet",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _overridable() -> onnx.ModelProto:
    model = _mlp()
    model.graph.input.append(helper.make_tensor_value_info("b1", TensorProto.FLOAT, [12]))
    return model


SEEDS = {"mlp": _mlp, "convnet": _convnet, "overridable": _overridable}


# --- mutations: each takes (model, rng) and returns serialized bytes -------------------------------------------

def _bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def flip_bytes(model, rng):
    data = bytearray(_bytes(model))
    for _ in range(int(rng.integers(1, 8))):
        data[int(rng.integers(len(data)))] ^= int(rng.integers(1, 256))
    return bytes(data)


def truncate(model, rng):
    data = _bytes(model)
    return data[: int(rng.integers(0, len(data)))]


def insert_bytes(model, rng):
    data = bytearray(_bytes(model))
    at = int(rng.integers(len(data)))
    return bytes(data[:at] + rng.integers(0, 256, int(rng.integers(1, 16))).astype(np.uint8).tobytes() + data[at:])


def delete_initializer(model, rng):
    del model.graph.initializer[int(rng.integers(len(model.graph.initializer)))]
    return _bytes(model)


def wrong_dims(model, rng):
    tensor = model.graph.initializer[int(rng.integers(len(model.graph.initializer)))]
    dims = list(tensor.dims)
    dims[int(rng.integers(len(dims)))] += int(rng.integers(1, 4))
    array = rng.standard_normal(dims).astype(np.float32)
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return _bytes(model)


def wrong_input_shape(model, rng):
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[int(rng.integers(len(dims)))].dim_value = int(rng.integers(1, 9))
    return _bytes(model)


def cycle(model, rng):
    nodes = model.graph.node
    first, last = 0, int(rng.integers(1, len(nodes)))
    nodes[first].input[0] = nodes[last].output[0]
    return _bytes(model)


def dangling_name(model, rng):
    node = model.graph.node[int(rng.integers(len(model.graph.node)))]
    node.input[int(rng.integers(len(node.input)))] = "nowhere"
    return _bytes(model)


def duplicate_output(model, rng):
    nodes = model.graph.node
    a, b = rng.choice(len(nodes), 2, replace=False)
    nodes[int(b)].output[0] = nodes[int(a)].output[0]
    return _bytes(model)


def duplicate_graph_output(model, rng):
    model.graph.output.append(model.graph.output[0])
    return _bytes(model)


def unknown_op(model, rng):
    model.graph.node[int(rng.integers(len(model.graph.node)))].op_type = "Frobnicate"
    return _bytes(model)


def custom_domain(model, rng):
    model.graph.node[int(rng.integers(len(model.graph.node)))].domain = "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return _bytes(model)


def overridable_initializer(model, rng):
    tensor = model.graph.initializer[int(rng.integers(len(model.graph.initializer)))]
    if all(i.name != tensor.name for i in model.graph.input):
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return _bytes(model)


def odd_opset(model, rng):
    model.opset_import[0].version = int(rng.choice([1, 6, 9, 12, 99, 1000]))
    return _bytes(model)


def wrong_elem_type(model, rng):
    model.graph.input[0].type.tensor_type.elem_type = int(rng.choice([TensorProto.INT64, TensorProto.STRING,
                                                                      TensorProto.DOUBLE, 0, 77]))
    return _bytes(model)


def drop_outputs(model, rng):
    del model.graph.output[:]
    return _bytes(model)


def bad_attribute(model, rng):
    node = model.graph.node[int(rng.integers(len(model.graph.node)))]
    node.attribute.append(helper.make_attribute("kernel_shape", [int(rng.integers(0, 9))] * 2))
    return _bytes(model)


def invalid_utf8(model, rng):
    """A name whose bytes are not UTF-8 (protobuf parses it; Python sees bytes, not str)."""
    node = model.graph.node[int(rng.integers(len(model.graph.node)))]
    node.name = "Q" * 6
    data = _bytes(model)
    return data.replace(b"Q" * 6, bytes([0xFF, 0xFE]) + rng.integers(128, 256, 4).astype(np.uint8).tobytes(), 1)


def markup_names(model, rng):
    """Names that rich would read as markup or that hold control characters."""
    for node, name in zip(model.graph.node, ["[/x]", "[bold]n", "a\nb", "t\x1e"], strict=False):
        node.name = name
    return _bytes(model)


def no_mutation(model, rng):
    return _bytes(model)


MUTATIONS = {f.__name__: f for f in (
    flip_bytes, truncate, insert_bytes, delete_initializer, wrong_dims, wrong_input_shape, cycle, dangling_name,
    duplicate_output, duplicate_graph_output, unknown_op, custom_domain, overridable_initializer, odd_opset,
    wrong_elem_type, drop_outputs, bad_attribute, invalid_utf8, markup_names,
    no_mutation)}


# --- one case ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    seed_model: str
    mutation: str
    seed: int
    command: str


@dataclass
class Verdict:
    case: Case
    code: int
    problems: list[str] = field(default_factory=list)
    stderr: str = ""


def _args(command: str, work: Path) -> tuple[list[str], list[Path]]:
    """The command line and the files it may write."""
    model, cal = str(work / "in.onnx"), str(work / "cal.npz")
    out, report = work / "out.onnx", work / "report.json"
    if command == "inspect":
        return ["inspect", model, "--report", str(report)], [report]
    if command == "run":
        return ["run", model, "--input", cal, "--output", str(work / "y.npz")], [work / "y.npz"]
    spec = {"cleanup": "cleanup", "structured-sparse": "structured-sparse:ratio=0.5", "quantize": "quantize"}[command]
    return [model, "--pass", spec, "-o", str(out), "--calibration", cal, "--report", str(report)], [out, report]


def _calibration(seed_model: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    shape = (8, 1, 6, 6) if seed_model == "convnet" else (8, 6)
    return {"x": rng.standard_normal(shape).astype(np.float32)}


def run_case(case: Case) -> Verdict:
    """Write the mutated model and calibration data to a fresh folder, run the command, judge the outcome."""
    from optimizer.cli import main

    rng = np.random.default_rng(case.seed)
    data = MUTATIONS[case.mutation](SEEDS[case.seed_model](), rng)
    with tempfile.TemporaryDirectory(prefix="sculpt-fuzz-") as tmp:
        work = Path(tmp)
        (work / "in.onnx").write_bytes(data)
        np.savez(work / "cal.npz", **_calibration(case.seed_model))
        inputs = {p.name: p.read_bytes() for p in work.iterdir()}
        args, outputs = _args(case.command, work)
        out, err = io.StringIO(), io.StringIO()
        with _native_stderr() as native:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(args)
            native.seek(0)
            leaked = native.read().strip()
        verdict = Verdict(case, code, stderr=err.getvalue())
        _judge(verdict, out.getvalue(), err.getvalue(), work, inputs, outputs)
        if leaked:  # C++ libraries (ORT, onnx) writing to file descriptor 2 themselves
            verdict.problems.append("third-party log lines")
    return verdict


@contextlib.contextmanager
def _native_stderr():
    """File descriptor 2 redirected to a temporary file for the block (what C++ code writes there)."""
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _judge(verdict: Verdict, stdout: str, stderr: str, work: Path, inputs: dict, outputs: list[Path]) -> None:
    problems = verdict.problems
    if verdict.code not in (0, 1, 2):
        problems.append(f"exit code {verdict.code}")
    if "Traceback" in stdout + stderr:
        problems.append("traceback")
    if "internal error" in stderr:
        problems.append("internal error")
    error_lines = [line.strip() for line in stderr.splitlines() if line.startswith("error:")]
    if verdict.code != 0 and (len(error_lines) != 1 or stderr.strip().splitlines()[-1] != error_lines[0]):
        problems.append(f"{len(error_lines)} error lines")
    if any((work / name).read_bytes() != content for name, content in inputs.items()):
        problems.append("input changed")
    leftovers = [p.name for p in work.iterdir() if p.name.startswith(".")]
    if verdict.code != 0 and any(p.exists() for p in outputs) or leftovers:
        problems.append("partial output")
    if verdict.code == 0 and outputs[0].suffix == ".onnx" and outputs[0].exists():
        try:
            onnx.checker.check_model(onnx.load(str(outputs[0])), full_check=True)
        except Exception as e:  # noqa: BLE001 - any failure to load the written model is the finding
            problems.append(f"written model does not load ({type(e).__name__})")


class Tally:
    """Counts of exit codes and of each kind of broken promise, over many verdicts."""

    KINDS = ("traceback", "internal error", "partial output", "input changed")

    def __init__(self):
        self.cases = 0
        self.codes: Counter[int] = Counter()
        self.problems: Counter[str] = Counter()
        self.examples: dict[str, Verdict] = {}

    def add(self, verdict: Verdict) -> None:
        self.cases += 1
        self.codes[verdict.code] += 1
        for problem in verdict.problems:
            kind = next((k for k in self.KINDS if problem.startswith(k)), problem)
            self.problems[kind] += 1
            self.examples.setdefault(kind, verdict)

    def line(self) -> str:
        codes = ", ".join(f"exit {c}: {n}" for c, n in sorted(self.codes.items()))
        kinds = ", ".join(f"{k} {self.problems[k]}" for k in self.KINDS)
        other = {k: n for k, n in self.problems.items() if k not in self.KINDS}
        return (f"fuzz tally: {self.cases} cases ({codes}); {kinds}"
                + (f"; other problems {dict(other)}" if other else "; other problems 0"))


