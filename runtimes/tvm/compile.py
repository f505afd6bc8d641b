"""ONNX model + fixed input shapes -> compiled Relax VM executable, and the facts describe() reports.

Steps: import (fold constants) -> NHWC convolutions -> Sculpt's kernels swapped in (rewrite.py) -> fast math ->
TVM's legalization and fusion -> schedules (MetaSchedule records when tuned, else the fallback rule) -> LLVM.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass

import onnx

from runtimes.tvm.fold import fold_constants
from runtimes.tvm.importer import import_onnx
from runtimes.tvm.kernels.bsr import BlockShape
from runtimes.tvm.legalize_minmax import legalize_minmax
from runtimes.tvm.rewrite import RewriteSettings, rewrite_layers
from runtimes.tvm.target import HostTarget


@dataclass
class BuildResult:
    executable: object  # tvm.relax.VMExecutable
    layers: list[dict]
    untouched: list[str]  # matmul/conv ops left to TVM's lowering, with the reason
    seconds: float


def build(
    model: onnx.ModelProto,
    shapes: dict[str, tuple[int, ...]],
    *,
    host: HostTarget,
    sparse: str,
    block: BlockShape | None,
    tuning_database: str | None = None,
) -> BuildResult:
    import tvm

    start = time.perf_counter()
    with native_stderr_silenced():
        mod, reports, untouched = rewritten_module(model, shapes, host=host, sparse=sparse, block=block)
        executable = tvm.compile(mod, target=host.target, relax_pipeline=_pipeline(host, tuning_database))
    return BuildResult(executable, [r.as_dict() for r in reports], untouched, time.perf_counter() - start)


@contextlib.contextmanager
def native_stderr_silenced():
    """TVM's C++ log warnings ("Fast mode segfaults when there are out-of-bounds indices" for every Gather)
    write straight to file descriptor 2; compile errors still arrive as Python exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def rewritten_module(model, shapes, *, host: HostTarget, sparse: str, block: BlockShape | None):
    """(Relax module with Sculpt's kernels in place, layer reports, matmul/conv ops left to TVM)."""
    from tvm import relax

    mod = import_onnx(model, shapes)
    mod = relax.transform.DecomposeOpsForInference()(mod)
    # a decomposed BatchNormalization leaves (y, mean, var)[0]: resolve it, so the chain from its conv continues
    mod = relax.transform.CanonicalizeBindings()(mod)
    mod = legalize_minmax(mod)  # ConvertLayout fails on the importer's max/min(stack(...), axis=0)
    mod = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"], "relax.nn.conv1d": ["NWC", "OWI"]})(mod)
    mod = fold_constants(mod)
    settings = RewriteSettings(sparse=sparse, block=block, lanes=host.vector_lanes)
    mod, reports, untouched = rewrite_layers(mod, settings, weight_layers(model))
    # polynomial erf/exp/tanh: vectorizable, unlike the libm calls (GELU took 7% of a transformer block)
    return relax.transform.FastMathTransform()(mod), reports, untouched


def fused_module(mod, host: HostTarget):
    """The module after TVM's legalization and fusion: the PrimFuncs that schedules (and tuning) apply to."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    with host.target:
        passes = cpu_generic.library_dispatch_passes(host.target) + cpu_generic.legalize_passes(host.target)
        return tvm.transform.Sequential(passes)(mod)


def _pipeline(host: HostTarget, tuning_database: str | None):
    """TVM's CPU pipeline, with schedules applied between fusion and lowering.

    Order: tuned records (if any) first, then the fallback rule for everything still unscheduled.
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import dlight

    from runtimes.tvm.kernels.fallback import default_cpu_schedule

    target = host.target

    @tvm.transform.module_pass(opt_level=0, name="SculptPipeline")
    def pipeline(mod, _ctx):
        mod = fused_module(mod, host)
        schedule = []
        if tuning_database:
            schedule.append(relax.transform.MetaScheduleApplyDatabase(tuning_database))
        schedule.append(dlight.ApplyDefaultSchedule(default_cpu_schedule(host.vector_lanes)))
        with target:
            seq = tvm.transform.Sequential(
                schedule + cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target)
            )
            return seq(mod)

    return pipeline


def weight_layers(model: onnx.ModelProto) -> list[tuple[str, str, tuple[int, ...]]]:
    """(node name, kind, weight shape as the Relax layer sees it) for ONNX Conv/Gemm/MatMul with constant weights."""
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            weights[node.output[0]] = tuple(node.attribute[0].t.dims)
    layers = []
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[1] not in weights:
            continue
        shape = weights[node.input[1]]
        name = node.name or node.output[0]
        if node.op_type == "Conv" and len(shape) == 4:
            layers.append((name, "conv2d", (shape[0], shape[2], shape[3], shape[1])))
        elif node.op_type == "Conv" and len(shape) == 3:
            layers.append((name, "conv1d", (shape[0], 1, shape[2], shape[1])))
        elif node.op_type == "MatMul" and len(shape) == 2:
            layers.append((name, "matmul", shape))
        elif node.op_type == "Gemm" and len(shape) == 2:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            layers.append((name, "matmul", shape[::-1] if trans_b else shape))
    return layers
