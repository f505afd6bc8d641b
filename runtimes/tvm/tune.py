"""`optimize tune`: MetaSchedule tuning of the ops Sculpt has no hand kernel for, kept in a persistent database.

The hand kernels (dense, BSR, conv, batched matmul) are marked scheduled and skipped; what is tuned is every
other fused PrimFunc of the model at the given input shapes (pooling, norms, softmax, elementwise chains...).
Records go to <cache dir>/tuning/<key>/, keyed like the compiled modules (model hash, target, shapes, sparse
options); a later `load` of the same model and shapes applies them (option tuned=false ignores them) and
recompiles once, since the compile cache key includes the database's state.
"""

from __future__ import annotations

import importlib.util
import time

import onnx

from optimizer.errors import MissingDependency, UsageError
from runtimes.tvm import cache
from runtimes.tvm.importer import shapes_for
from runtimes.tvm.options import TvmOptions

_WORKER_TIMEOUT_S = 300


def tune(model: onnx.ModelProto, *, trials: int, options: TvmOptions, seed: int = 0) -> dict:
    """Tune for `trials` measured candidates in total; returns where the records are and what was tuned."""
    for module, package in (("tvm", "apache-tvm"), ("psutil", "psutil"), ("cloudpickle", "cloudpickle")):
        if importlib.util.find_spec(module) is None:
            raise MissingDependency(package, "tvm")
    if trials < 1:
        raise UsageError(f"optimize tune: --trials {trials} must be at least 1")
    shapes = shapes_for(model, options.batch)
    if shapes is None:
        raise UsageError("optimize tune: the model has open input dimensions; give the batch with --batch")
    from tvm.s_tir import meta_schedule as ms

    from runtimes.tvm.compile import fused_module, rewritten_module
    from runtimes.tvm.target import host_target, prepare_thread_pool

    prepare_thread_pool()
    host = host_target()
    start = time.perf_counter()
    mod, _, _ = rewritten_module(model, shapes, host=host, sparse=options.sparse, block=options.block)
    fused = fused_module(mod, host)
    work_dir = cache.tuning_dir(options.cache_dir, cache.model_hash(model), host.key(), shapes, options.code_settings())
    work_dir.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in ms.relax_integration.extract_tasks(fused, host.target) if not _scheduled(t)]
    if not tasks:
        return {"work_dir": str(work_dir), "tasks": [], "trials": 0, "seconds": 0.0}
    cost_model = "xgb" if importlib.util.find_spec("xgboost") else "random"
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(tasks, str(work_dir), seed=seed)
    ms.tune.tune_tasks(
        tasks=contexts,
        task_weights=weights,
        work_dir=str(work_dir),
        max_trials_global=trials,
        num_trials_per_iter=min(64, trials),
        cost_model=cost_model,
        # worker processes import TVM first: on a busy host that alone outlasts the default 30 s timeouts
        builder=ms.builder.LocalBuilder(max_workers=1, timeout_sec=_WORKER_TIMEOUT_S),
        runner=ms.runner.LocalRunner(timeout_sec=_WORKER_TIMEOUT_S),
    )
    return {
        "work_dir": str(work_dir),
        "tasks": [t.task_name for t in tasks],
        "trials": trials,
        "cost_model": cost_model,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _scheduled(task) -> bool:
    return any(bool(func.attrs.get("tirx.is_scheduled", False)) for func in task.dispatched[0].functions.values())
