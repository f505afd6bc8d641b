"""Run a Relax PyExprMutator over every Relax function of a module: the loop the three rewrites share."""

from __future__ import annotations

from collections.abc import Callable


def rewrite_functions(mutator, mod, *, before: Callable | None = None, after: Callable | None = None):
    """The module `mutator` builds from `mod`'s Relax functions (other functions are kept as they are).

    before(func) runs ahead of each function's visit (to collect what the visit needs); after(func) post-processes
    the visited function before it replaces the old one.
    """
    from tvm import relax

    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            if before is not None:
                before(func)
            new = mutator.visit_expr(func)
            mutator.builder_.update_func(gvar, new if after is None else after(new))
    return mutator.builder_.get()
