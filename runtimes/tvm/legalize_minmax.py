"""Rewrite the importer's stack-and-reduce form of ONNX Max/Min/Sum/Mean into pairwise elementwise ops.

TVM's ONNX importer turns `Max(a, b, ...)` into `max(stack([broadcast_to(a), broadcast_to(b), ...]), axis=0)`
(likewise Min, Sum, Mean). ConvertLayout cannot carry a layout through that reduce over the new stack axis and
fails with "Invalid SLayout: can't find S in source layout ABCDE". The pairwise form `maximum(maximum(a, b), ...)`
is equal under ONNX's multidirectional broadcasting, and elementwise binary ops follow any layout, so a Max between
two convolutions no longer forces the activations back to NCHW.
"""

from __future__ import annotations

import functools

import numpy as np

from runtimes.tvm.mutate import rewrite_functions

_PAIRWISE = {"relax.max": "maximum", "relax.min": "minimum", "relax.sum": "add", "relax.mean": "add"}


def legalize_minmax(mod):
    """`mod` with every reduce over axis 0 of a `stack(..., axis=0)` in _PAIRWISE folded pairwise."""
    import tvm_ffi
    from tvm import ir, relax
    from tvm.ir.expr import Constant

    @relax.expr_functor.mutator
    class PairwiseReduce(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call.op, ir.Op) or call.op.name not in _PAIRWISE or not _reduces_axis_zero(call):
                return call
            operands = self._stacked_operands(call.args[0])
            if operands is None:
                return call
            binary = getattr(relax.op, _PAIRWISE[call.op.name])
            result = functools.reduce(lambda lhs, rhs: self.builder_.normalize(binary(lhs, rhs)), operands)
            if call.op.name == "relax.mean":
                count = relax.const(len(operands), call.ty.dtype)
                result = self.builder_.normalize(relax.op.divide(result, count))
            if not tvm_ffi.structural_equal(result.ty.shape, call.ty.shape):
                result = relax.op.broadcast_to(result, call.ty.shape)
            return result

        def _stacked_operands(self, expr) -> list | None:
            """The operands of `stack(..., axis=0)` bound to `expr`, each without its importer-added broadcast_to."""
            stack = self._bound(expr)
            if not _is_call(stack, "relax.stack") or int(stack.attrs.axis) != 0:
                return None
            items = self._bound(stack.args[0])
            if not isinstance(items, relax.Tuple) or len(items.fields) < 2:
                return None
            return [self._unbroadcast(item) for item in items.fields]

        def _unbroadcast(self, expr):
            """The input of a broadcast_to (the pairwise ops broadcast themselves); a uniform constant as a scalar,
            since FoldConstant has already expanded a broadcast scalar such as Max(x, 0) to the full shape."""
            bound = self._bound(expr)
            if _is_call(bound, "relax.broadcast_to"):
                return bound.args[0]
            if isinstance(expr, Constant):
                value = expr.value.numpy()
                if value.size > 1 and np.all(value == value.flat[0]):
                    return relax.const(value.flat[0], str(value.dtype))
            return expr

        def _bound(self, expr):
            """What a dataflow variable is bound to (the expression itself when it is not a bound variable)."""
            if isinstance(expr, relax.Var):
                bound = self.lookup_binding(expr)
                if bound is not None:
                    return bound
            return expr

    return rewrite_functions(PairwiseReduce(mod), mod, after=relax.analysis.remove_all_unused)


def _is_call(expr, op_name: str) -> bool:
    from tvm import ir, relax

    return isinstance(expr, relax.Call) and isinstance(expr.op, ir.Op) and expr.op.name == op_name


def _reduces_axis_zero(call) -> bool:
    axis = call.attrs.axis
    return axis is not None and [int(a) for a in axis] == [0] and not call.attrs.keepdims
