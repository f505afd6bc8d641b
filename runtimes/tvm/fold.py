"""Constant folding in numpy for the few ops that import and layout conversion apply to weights.

TVM's FoldConstant compiles and runs a kernel for every foldable call, which costs ~0.1-0.4 s each: the
weight and bias permutes of a ResNet-18 alone took 10 s. These ops are one numpy call each. TVM's FoldConstant
still runs afterwards for whatever this does not cover, and then has little left to do.
"""

from __future__ import annotations

import numpy as np

from runtimes.tvm.mutate import rewrite_functions

_BINARY = {
    "relax.add": np.add,
    "relax.subtract": np.subtract,
    "relax.multiply": np.multiply,
    "relax.divide": np.divide,
}
_UNARY = {"relax.sqrt": np.sqrt, "relax.rsqrt": lambda a: 1 / np.sqrt(a), "relax.negative": np.negative}


def fold_constants(mod):
    from tvm import ir, relax

    @relax.expr_functor.mutator
    class NumpyFolder(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call.op, ir.Op):
                return call
            folded = _evaluate(call)
            return call if folded is None else relax.const(folded)

    return relax.transform.FoldConstant()(rewrite_functions(NumpyFolder(mod), mod))


def _value(expr) -> np.ndarray | None:
    from tvm.ir.expr import Constant

    return expr.value.numpy() if isinstance(expr, Constant) else None


def _evaluate(call) -> np.ndarray | None:
    from tvm import relax

    name = call.op.name
    first = _value(call.args[0]) if call.args else None
    if first is None:
        return None
    if name == "relax.permute_dims":
        axes = call.attrs.axes
        return np.ascontiguousarray(np.transpose(first, None if axes is None else [int(a) for a in axes]))
    if name == "relax.reshape" and isinstance(call.args[1], relax.ShapeExpr):
        return first.reshape([int(v) for v in call.args[1].values])
    if name in _UNARY:
        return _UNARY[name](first).astype(first.dtype)
    if name in _BINARY:
        second = _value(call.args[1])
        if second is None or second.dtype != first.dtype:
            return None
        return _BINARY[name](first, second).astype(first.dtype)
    return None
