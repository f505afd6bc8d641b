"""Embedding tables in structured-sparse: a lookup table's columns are channels, and embeddings=factor makes a
large table's rank a channel group (SVD, then the weakest singular directions go).

The references are independent of the pass: numpy's SVD truncation of the table put into the original graph,
the original with the removed columns zeroed, and ONNX Runtime outputs of both.
"""

from __future__ import annotations

import numpy as np
import onnx
from channel_graphs import run
from onnx import TensorProto, helper, numpy_helper

from passes import PassContext
from passes.graph.embedding_factor import factor_embeddings, merge_unsaved
from passes.structured_sparse import StructuredSparse, count_params

VOCAB, WIDTH, TOKENS = 200, 16, 6


def _embedding_model(table: np.ndarray, head: str) -> onnx.ModelProto:
    """ids [n, 6] -> Gather(table) -> LayerNormalization -> MatMul [16, 4] (head="norm": the hidden width is
    tied by the norm, so only a factored rank can be cut) or -> ReduceMean over tokens -> Gemm [4, 16] (head=
    "linear": the table's columns are channels the Gemm reduces)."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(table, "table")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="lookup")]
    if head == "norm":
        inits += [numpy_helper.from_array(np.ones(WIDTH, np.float32), "gamma"),
                  numpy_helper.from_array(np.zeros(WIDTH, np.float32), "beta"),
                  numpy_helper.from_array(rng.standard_normal((WIDTH, 4)).astype(np.float32), "w")]
        nodes += [helper.make_node("LayerNormalization", ["emb", "gamma", "beta"], ["normed"], name="norm", axis=-1),
                  helper.make_node("MatMul", ["normed", "w"], ["y"], name="head")]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", TOKENS, 4])
    else:
        inits += [numpy_helper.from_array(rng.standard_normal((4, WIDTH)).astype(np.float32), "w"),
                  numpy_helper.from_array(np.zeros(4, np.float32), "b")]
        nodes += [helper.make_node("ReduceMean", ["emb"], ["pooled"], name="pool", axes=[1], keepdims=0),
                  helper.make_node("Gemm", ["pooled", "w", "b"], ["y"], name="head", transB=1)]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", TOKENS])],
                              [out], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _table(rank: int = WIDTH) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((VOCAB, rank)) @ rng.standard_normal((rank, WIDTH))).astype(np.float32)


def _ids(count: int = 16) -> dict[str, np.ndarray]:
    return {"ids": np.random.default_rng(2).integers(0, VOCAB, (count, TOKENS)).astype(np.int64)}


def _pass(model, **options):
    new, details = StructuredSparse(StructuredSparse.Options(**options)).run(model, PassContext())
    onnx.checker.check_model(new, full_check=True)
    return new, details


def _truncated(table: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(table.astype(np.float64), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vt[:rank]).astype(np.float32)


def _with_table(model: onnx.ModelProto, table: np.ndarray) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for index, init in enumerate(copy.graph.initializer):
        if init.name == "table":
            copy.graph.initializer[index].CopyFrom(numpy_helper.from_array(table, "table"))
    return copy


def test_factoring_is_exact_at_full_rank_and_makes_the_rank_prunable():
    model = _embedding_model(_table(), "norm")
    factored, tables = factor_embeddings(model)
    assert [t.gather for t in tables] == ["lookup"]
    assert [n.op_type for n in factored.graph.node][:2] == ["Gather", "MatMul"]
    np.testing.assert_allclose(run(factored, _ids())[0], run(model, _ids())[0], atol=1e-4)
    # a table too narrow for its vocabulary to gain from a factorization is left alone
    small = _embedding_model(_table()[: 3 * WIDTH], "norm")
    assert factor_embeddings(small) == (small, [])


def test_a_half_rank_cut_equals_numpys_truncated_svd_in_the_original_graph():
    table = _table()
    model = _embedding_model(table, "norm")
    new, details = _pass(model, keep_params=0.554)  # rank 8: (8 x 216 + 96) / 3296 weights = 0.5534
    shapes = {i.name: list(i.dims) for i in new.graph.initializer}
    assert [VOCAB, WIDTH // 2] in shapes.values() and [WIDTH // 2, WIDTH] in shapes.values()
    assert count_params(new) == VOCAB * 8 + 8 * WIDTH + 2 * WIDTH + WIDTH * 4
    reference = run(_with_table(model, _truncated(table, WIDTH // 2)), _ids())[0]
    np.testing.assert_allclose(run(new, _ids())[0], reference, atol=1e-4)
    rank_group = next(g for g in details["groups"] if g["producers"] == ["lookup"])
    assert rank_group["channels_after"] == 8 and "singular value" in rank_group["importance"]["note"]


def test_a_rank_cut_that_saves_nothing_is_multiplied_back_into_one_table():
    table = _table()
    model = _embedding_model(table, "norm")
    factored, tables = factor_embeddings(model)
    edit_rank = onnx.ModelProto()
    edit_rank.CopyFrom(factored)
    for init in edit_rank.graph.initializer:  # keep 15 of 16 directions: 15 x (200 + 16) > 200 x 16
        values = numpy_helper.to_array(init)
        if values.shape == (VOCAB, WIDTH):
            init.CopyFrom(numpy_helper.from_array(values[:, :15].copy(), init.name))
        elif values.shape == (WIDTH, WIDTH):
            init.CopyFrom(numpy_helper.from_array(values[:15].copy(), init.name))
    merged = merge_unsaved(edit_rank, tables, model)
    assert [n.op_type for n in merged.graph.node].count("MatMul") == 1
    assert count_params(merged) == count_params(model)
    reference = run(_with_table(model, _truncated(table, 15)), _ids())[0]
    np.testing.assert_allclose(run(merged, _ids())[0], reference, atol=1e-4)
    # an uncut rank gets the original table back, bit for bit
    restored = merge_unsaved(factored, tables, model)
    restored_table = next(i for i in restored.graph.initializer if i.name == "table")
    assert numpy_helper.to_array(restored_table).tobytes() == table.tobytes()


def test_an_exactly_low_rank_table_loses_its_empty_directions_without_changing_the_outputs():
    model = _embedding_model(_table(rank=5), "norm")
    # rank 5 of 16: (5 x 216 + 96) / 3296; a cut deeper than the default max_ratio (0.5) of the rank
    new, _ = _pass(model, keep_params=0.357, max_ratio=0.75)
    assert count_params(new) == VOCAB * 5 + 5 * WIDTH + 2 * WIDTH + WIDTH * 4
    np.testing.assert_allclose(run(new, _ids())[0], run(model, _ids())[0], atol=1e-4)


def test_ratio_and_embeddings_count_leave_the_table_whole():
    model = _embedding_model(_table(), "norm")
    for options in ({"ratio": 0.5}, {"keep_params": 0.6, "embeddings": "count"}):
        new, details = _pass(model, **options)
        assert count_params(new) == count_params(model)
        assert details["summary"]["pruned_groups"] == 0


def test_a_lookup_table_feeding_a_linear_layer_loses_columns_like_a_zeroed_twin():
    table = _table()
    model = _embedding_model(table, "linear")
    new, details = _pass(model, ratio=0.5, embeddings="count", criterion="l1")
    group = next(g for g in details["groups"] if g["producers"] == ["lookup"])
    kept = np.asarray(group["kept"])
    assert len(kept) == WIDTH // 2
    assert {tuple(i.dims) for i in new.graph.initializer} >= {(VOCAB, 8), (4, 8)}
    zeroed = table.copy()
    zeroed[:, np.setdiff1d(np.arange(WIDTH), kept)] = 0
    np.testing.assert_allclose(run(new, _ids())[0], run(_with_table(model, zeroed), _ids())[0], atol=1e-4)
    l1 = np.abs(table).sum(0)
    assert set(kept.tolist()) == set(np.argsort(-l1)[:8].tolist())


def test_keep_params_spends_on_the_rank_and_lands():
    model = _embedding_model(_table(), "linear")
    calibration = _ids(64)
    new, details = StructuredSparse(StructuredSparse.Options(keep_params=0.6)).run(
        model, PassContext(calibration=calibration, calibration_is_random=False))
    reached = count_params(new) / count_params(model)
    assert abs(reached - 0.6) <= 0.02
    rank = next(g for g in details["groups"] if g["producers"] == ["lookup"])
    assert rank["channels_after"] < WIDTH  # the budget spent some of it on the table's rank
    assert details["summary"]["weights_kept"] == round(reached, 4)


def test_a_plan_made_with_a_factored_table_applies_to_a_re_export(tmp_path):
    table = _table()
    model = _embedding_model(table, "norm")
    plan = tmp_path / "plan.json"
    first, _ = _pass_writing_plan(model, plan, keep_params=0.554)
    again, details = _pass(model, plan=str(plan))
    assert details["summary"]["pruned_groups"] == 1
    np.testing.assert_allclose(run(again, _ids())[0], run(first, _ids())[0], atol=1e-6)
    # a plan made by a ratio run (no factoring) still applies
    ratio_plan = tmp_path / "ratio.json"
    _pass_writing_plan(model, ratio_plan, ratio=0.5)
    _pass(model, plan=str(ratio_plan))


def _pass_writing_plan(model, path, **options):
    result = StructuredSparse(StructuredSparse.Options(plan_out=str(path), **options)).run(model, PassContext())
    for artifact in result.artifacts:
        path.write_bytes(artifact.content)
    return result.model, result.report
