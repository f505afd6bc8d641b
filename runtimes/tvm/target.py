"""The compilation target (the host CPU) and the TVM thread pool.

TVM 0.27 accepts only dict targets, and `mcpu: native` silently degrades to `generic` (no AVX at all), so the
CPU name is asked from LLVM. The thread pool is process-wide: its size is fixed when it first starts, so it is
started with every available core, unpinned, and each session then selects how many of them it uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

_TRIPLE = "x86_64-linux-gnu"
_USER_THREADS = os.environ.get("TVM_NUM_THREADS", "").strip()  # read before prepare_thread_pool() overwrites it
_pool_threads: int | None = None
_threads_in_use: int | None = None


@dataclass(frozen=True)
class HostTarget:
    """The detected CPU: the TVM target plus the facts the kernels are shaped by."""

    target: object  # tvm.target.Target
    mcpu: str
    vector_lanes: int  # float32 lanes of the widest vector register LLVM will use

    def describe(self) -> str:
        return f"llvm -mtriple={_TRIPLE} -mcpu={self.mcpu} ({self.vector_lanes} x f32 vectors)"

    def key(self) -> str:
        return f"llvm-{_TRIPLE}-{self.mcpu}"


@cache
def host_target() -> HostTarget:
    import tvm
    from tvm.target import codegen

    mcpu = codegen.llvm_get_system_cpu()
    # num-cores: MetaSchedule needs it, and records apply only under the target they were tuned for
    target = tvm.target.Target({"kind": "llvm", "mtriple": _TRIPLE, "mcpu": mcpu, "num-cores": available_cores()})
    if codegen.llvm_cpu_has_features("avx512f", target):
        lanes = 16
    elif codegen.llvm_cpu_has_features("avx2", target):
        lanes = 8
    else:
        lanes = 4
    return HostTarget(target=target, mcpu=mcpu, vector_lanes=lanes)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """TVM_NUM_THREADS when the user set it, else every core this process may run on."""
    if _USER_THREADS.isdigit() and int(_USER_THREADS) > 0:
        return int(_USER_THREADS)
    return available_cores()


def prepare_thread_pool() -> None:
    """Call before anything in TVM runs: size the pool to all cores and keep threads unpinned.

    TVM's default pool uses half the logical cores (it assumes hyper-threading) and pins the calling thread to
    one core, which would also confine every thread ONNX Runtime starts later in the same process.
    """
    global _pool_threads
    if _pool_threads is None:
        _pool_threads = max(available_cores(), default_threads())
        os.environ["TVM_NUM_THREADS"] = str(_pool_threads)
        os.environ.setdefault("TVM_BIND_THREADS", "0")


def use_threads(threads: int) -> None:
    """Make the next TVM calls run on `threads` worker threads (at most the pool's size).

    The pool is shared by the whole process, so a session calls this before each run; it is cheap when the
    count does not change.
    """
    global _threads_in_use
    if threads != _threads_in_use:
        import tvm

        prepare_thread_pool()
        tvm.get_global_func("runtime.config_threadpool")(1, threads)
        _threads_in_use = threads
