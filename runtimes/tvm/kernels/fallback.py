"""A default CPU schedule for every PrimFunc Sculpt has no hand kernel for (pooling, softmax, norms, elementwise).

TVM's default CPU pipeline leaves legalized ops as naive serial loops. This rule, applied like a dlight rule,
inlines what can be inlined and gives each remaining block parallel outer loops and a vectorized innermost loop
where the innermost output axis is also contiguous in every buffer the block touches.
"""

from __future__ import annotations

# Below this many loop iterations a block runs serially: waking the thread pool costs more than it saves.
_MIN_PARALLEL_ITERATIONS = 8192


def default_cpu_schedule(lanes: int):
    """A dlight ScheduleRule for CPU fallback scheduling with `lanes`-wide vectors."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import ScheduleRule, try_inline

    class CpuFallback(ScheduleRule):
        def apply(self, func, target, tunable):
            from tvm import s_tir, tirx

            if not isinstance(func, tirx.PrimFunc):
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None:
                return None
            for info in try_inline(sch, infos):
                _schedule_block(sch, info, lanes)
            return sch

    return CpuFallback()


def _schedule_block(sch, info, lanes: int) -> None:
    block = info.block_rv
    loops = sch.get_loops(block)
    kinds = info.dom_kind()
    if len(loops) != len(kinds) or "O" in kinds or not loops:
        return
    spatial = [loop for loop, kind in zip(loops, kinds, strict=True) if kind == "S"]
    reduction = [loop for loop, kind in zip(loops, kinds, strict=True) if kind == "R"]
    iterations = 1
    for loop in loops:
        iterations *= _extent(sch, loop)
    vector, ragged = None, False
    if spatial and _contiguous_innermost(sch, block, info, len(spatial) - 1) and _extent(sch, spatial[-1]) >= lanes:
        if _extent(sch, spatial[-1]) % lanes == 0:
            outer_part, vector = sch.split(spatial[-1], [None, lanes])
            spatial = [*spatial[:-1], outer_part]
        elif reduction:  # e.g. a mean over time of 1500 NWC channels: reduce outside the contiguous axis, which
            # LLVM then vectorizes, remainder included (inside it, the reduction strides through memory: 7x slower)
            vector, spatial, ragged = spatial[-1], spatial[:-1], True
    try:
        sch.reorder(*spatial, *reduction, *([vector] if vector is not None else []))
    except Exception:  # loops that cannot be reordered keep their order and stay serial
        return
    if vector is not None and not ragged:
        sch.vectorize(vector)
    if spatial and iterations >= _MIN_PARALLEL_ITERATIONS:
        sch.parallel(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])
    if reduction and vector is not None:
        sch.decompose_reduction(block, reduction[0])


def _extent(sch, loop) -> int:
    from tvm import tirx

    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else 0


def _contiguous_innermost(sch, block, info, spatial_index: int) -> bool:
    """True when the last spatial block iterator indexes the last axis of every buffer region the block touches."""
    stmt = sch.get(block)
    spatial_vars = [iv.var for iv in stmt.iter_vars if iv.iter_type == 0]
    if spatial_index >= len(spatial_vars):
        return False
    var = spatial_vars[spatial_index]
    for region in [*stmt.reads, *stmt.writes]:
        if not region.region:
            continue
        last = region.region[-1]
        if not (last.min.same_as(var) and int(last.extent) == 1):
            return False
    return True
