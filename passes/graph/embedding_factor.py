"""Embedding tables as a rank that channel pruning can cut.

A lookup `Gather(E[V, D], ids)` has no channel whose removal shrinks the V x D table: its D columns feed the
model's hidden width, which normalisation layers tie together. Factored by SVD, E = (U S) Vt, the lookup
becomes `Gather(U S [V, D], ids) -> MatMul(Vt [D, D])`, exact at full rank; the D singular directions between
the two are then an ordinary channel group (the Gather creates them, the MatMul reduces them), and removing k of
them saves k (V + D) weights. The directions are ranked by their singular value, whatever the criterion: the
truncated SVD is the least-squares best rank-r table over the whole vocabulary, while calibration sentences
only ever read a few hundred of its rows, so neither the ranking nor a refit of Vt may follow them
(`embedding_scores`, and the MatMul is left out of recovery). What a cut costs is still measured on the
calibration tokens (the pass uses their activation sensitivity): frequent tokens keep far more of their energy
in the weak directions than the average row (all-MiniLM-L6-v2: 7 % of it beyond rank 360 against 0.7 %), so
the vocabulary's energy share would make the rank look ten times cheaper than it is. A table whose kept rank
saves nothing is multiplied back into one table (`merge_unsaved`); an uncut one gets its original values back.

    >>> factored, tables = factor_embeddings(prepared)        # doctest: +SKIP
    >>> pruned = merge_unsaved(pruned, tables, prepared)     # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from passes.graph.edit import GraphEdit
from passes.graph.groups import Analysis

MIN_ROWS_PER_COLUMN = 4  # a table with fewer rows than 4x its width saves too little per direction to factor
MIN_WIDTH = 8


@dataclass(frozen=True)
class FactoredTable:
    """One factored lookup: the Gather now reads `factor` (U S), the new MatMul `basis` multiplies by Vt."""

    gather: str  # node names
    basis: str
    table: str  # the original table's initializer name
    singular: np.ndarray  # singular values, the order of the new channels (descending)


def factor_embeddings(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[FactoredTable]]:
    """Factor every embedding table of `model` (a 2-D float initializer read only by one Gather along axis 0
    with computed indices, at least MIN_ROWS_PER_COLUMN times as many rows as columns). Returns the model
    unchanged (the same object) with [] when there is none.

        >>> model, tables = factor_embeddings(bert)  # a 30522 x 384 table -> Gather [30522, 384] -> MatMul [384, 384]
        ... # doctest: +SKIP
    """
    edit = GraphEdit(model)
    tables = []
    for node in list(edit.graph.nodes):
        table = node.inputs[0] if node.op == "Gather" and node.inputs else None
        if not _factorable(node, table):
            continue
        values = table.values
        # the right singular vectors from the D x D Gram matrix: V x D^2 work and one copy of the table, where a
        # full SVD of a 250k-row multilingual table would hold two; U S = E V is computed from E itself, so
        # (U S) Vt reproduces E to float precision whatever the Gram matrix's conditioning
        e64 = values.astype(np.float64)
        energy, v = np.linalg.eigh(e64.T @ e64)
        order = np.argsort(energy)[::-1]
        v = v[:, order]
        s = np.sqrt(np.maximum(energy[order], 0.0))
        factor = edit.add_initializer((e64 @ v).astype(values.dtype), f"{table.name}/factor")
        basis = edit.add_initializer(v.T.astype(values.dtype), f"{table.name}/basis")
        output = node.outputs[0]
        rank = edit.variable(f"{output.name}/rank", dtype=output.dtype)
        node.inputs[0] = factor
        node.outputs[0] = rank
        matmul = edit.add_node("MatMul", [rank, basis], [output], hint=f"{node.name}/basis")
        tables.append(FactoredTable(node.name, matmul.name, table.name, s))
    if not tables:
        return model, []
    return edit.to_model(), tables


def _factorable(node: gs.Node, table) -> bool:
    if not isinstance(table, gs.Constant) or node.attrs.get("axis", 0) not in (0, -2) or not node.name:
        return False
    values = table.values
    if values.ndim != 2 or values.dtype.kind != "f" or len(table.outputs) != 1:
        return False
    rows, width = values.shape
    return width >= MIN_WIDTH and rows >= MIN_ROWS_PER_COLUMN * width and not isinstance(node.inputs[1], gs.Constant)


def embedding_scores(analysis: Analysis, tables: list[FactoredTable]) -> dict[int, np.ndarray]:
    """group id -> the singular value of each direction, for each factored table's rank group (its ranking,
    whatever the criterion)."""
    by_gather = {t.gather: t for t in tables}
    found = {}
    for group in analysis.groups:
        hits = [by_gather[p] for p in group.producers if p in by_gather]
        if len(hits) == 1 and len(group.producers) == 1 and group.channels == len(hits[0].singular):
            found[group.id] = hits[0].singular.astype(np.float64)
    return found


def merge_unsaved(model: onnx.ModelProto, tables: list[FactoredTable], original: onnx.ModelProto
                  ) -> onnx.ModelProto:
    """Undo each factorization that saves no weights: an uncut rank gets the original table back (from
    `original`, the model before factoring), a cut one keeping r >= V D / (V + D) directions becomes the one
    table (U S)_r Vt_r. Returns `model` itself when nothing is merged."""
    if not tables:
        return model
    edit = GraphEdit(model)
    nodes = {n.name: n for n in edit.graph.nodes}
    originals = {t.name: t for t in original.graph.initializer}
    merged = False
    for table in tables:
        gather, basis = nodes.get(table.gather), nodes.get(table.basis)
        if gather is None or basis is None or not isinstance(gather.inputs[0], gs.Constant) \
                or not isinstance(basis.inputs[1], gs.Constant):
            continue
        factor, vt = gather.inputs[0].values, basis.inputs[1].values
        rows, rank = factor.shape
        width = vt.shape[1]
        if rank < len(table.singular) and rank * (rows + width) < rows * width:
            continue  # the factored form is smaller: keep it
        if rank == len(table.singular) and table.table in originals:
            values = numpy_helper.to_array(originals[table.table])
        else:
            values = (factor.astype(np.float64) @ vt.astype(np.float64)).astype(factor.dtype)
        output = basis.outputs[0]
        basis.inputs.clear()
        basis.outputs.clear()
        gather.inputs[0] = edit.add_initializer(values, table.table)
        gather.outputs[0] = output
        merged = True
    return edit.to_model() if merged else model
