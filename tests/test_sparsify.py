"""The sparsify pass: achieved sparsity per pattern, block orientation, exact N:M groups, global scope, errors."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.errors import PassError, UsageError
from passes import PassContext, get_pass
from passes.sparsify import METADATA_KEY, Sparsify

RNG_SEED = 0


def _model() -> onnx.ModelProto:
    """x[N, 3, 12, 12] -> Conv(16, 3x3) -> Relu -> Flatten -> Gemm(transB=1, 96) -> MatMul(48) -> Gemm(transB=0, 40).

    Widths are not multiples of every block shape, so edge blocks are partial.
    """
    rng = np.random.default_rng(RNG_SEED)

    def weight(name, *shape, scale=1.0):
        return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name)

    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
            helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "fc1_w", "fc1_b"], ["h1"], name="fc1", transB=1),
            helper.make_node("MatMul", ["h1", "mm_w"], ["h2"], name="mm"),
            helper.make_node("Gemm", ["h2", "fc2_w"], ["y"], name="fc2", transB=0),
        ],
        "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 40])],
        [
            weight("conv_w", 16, 3, 3, 3, scale=0.5),  # scales differ, so a global threshold is not uniform
            weight("conv_b", 16),
            weight("fc1_w", 96, 16),
            weight("fc1_b", 96),
            weight("mm_w", 96, 48, scale=3.0),
            weight("fc2_w", 48, 40),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model, **options):
    pass_ = Sparsify(Sparsify.Options(**options))
    result, details = pass_.run(model, PassContext())
    onnx.checker.check_model(result, full_check=True)
    return result, details


def _weights(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _out_in(name: str, array: np.ndarray) -> np.ndarray:
    """The [out, in] view the pass documents: conv filters x (c, kh, kw); Gemm transB=0 and MatMul transposed."""
    if name == "conv_w":
        return array.reshape(array.shape[0], -1)
    return array if name == "fc1_w" else array.T


PRUNED = ("conv_w", "fc1_w", "mm_w", "fc2_w")


@pytest.mark.parametrize("pattern", ["element", "16x1", "8x8", "8x1", "4x4", "1x4"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_layer_scope_meets_the_target_within_one_point(pattern, sparsity):
    model = _model()
    result, details = _run(model, sparsity=sparsity, pattern=pattern)
    assert abs(details["achieved_sparsity"] - sparsity) <= 0.01
    before, after = _weights(model), _weights(result)
    for row in details["layers"]:
        name = row["initializer"]
        achieved = float((after[name] == 0).mean())
        assert row["sparsity"] == pytest.approx(achieved, abs=1e-6)
        rows, cols = (1, 1) if pattern == "element" else map(int, pattern.split("x"))
        blocks = -(-row["matrix"][0] // rows) * -(-row["matrix"][1] // cols)
        # a layer meets the target to within one block's share of its elements
        assert abs(achieved - sparsity) <= max(0.01, 1.0 / blocks), name
        kept = after[name] != 0
        np.testing.assert_array_equal(after[name][kept], before[name][kept])  # survivors are untouched
    assert after["conv_b"].tolist() == before["conv_b"].tolist()  # biases are not pruned


@pytest.mark.parametrize("pattern", ["16x1", "8x8", "1x4"])
def test_blocks_are_whole_and_oriented_out_by_in(pattern):
    rows, cols = map(int, pattern.split("x"))
    result, details = _run(_model(), sparsity=0.7, pattern=pattern)
    weights = _weights(result)
    for row in details["layers"]:
        matrix = _out_in(row["initializer"], weights[row["initializer"]])
        assert list(matrix.shape) == row["matrix"]
        padded = np.full((-(-matrix.shape[0] // rows) * rows, -(-matrix.shape[1] // cols) * cols), np.nan)
        padded[: matrix.shape[0], : matrix.shape[1]] = matrix  # NaN marks the padding of partial edge blocks
        blocks = padded.reshape(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols).transpose(0, 2, 1, 3)
        blocks = blocks.reshape(*blocks.shape[:2], -1)
        all_zero = np.all((blocks == 0) | np.isnan(blocks), axis=-1)
        all_kept = np.all(blocks != 0, axis=-1)  # NaN != 0 holds
        # every block is all zero or fully kept (random weights have no accidental zeros)
        assert np.all(all_zero | all_kept), row["initializer"]
        assert row["block_sparsity"] == pytest.approx(all_zero.mean(), abs=1e-6)


def test_element_pattern_prunes_the_smallest_magnitudes():
    model = _model()
    result, _ = _run(model, sparsity=0.6, pattern="element")
    before, after = _weights(model), _weights(result)
    for name in PRUNED:
        pruned = np.abs(before[name][after[name] == 0])
        kept = np.abs(before[name][after[name] != 0])
        assert pruned.max() <= kept.min()


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_n_of_m_is_exact_in_every_group(pattern):
    n, m = map(int, pattern.split(":"))
    model = _model()
    result, details = _run(model, pattern=pattern)
    assert details["target_sparsity"] == pytest.approx(1 - n / m)
    weights, original = _weights(result), _weights(model)
    for row in details["layers"]:
        matrix = _out_in(row["initializer"], weights[row["initializer"]])
        source = _out_in(row["initializer"], original[row["initializer"]])
        full = matrix.shape[1] // m * m
        groups = (matrix[:, :full] != 0).reshape(matrix.shape[0], -1, m).sum(-1)
        assert np.all(groups == n), row["initializer"]
        # the kept ones are the N largest of their group
        magnitude = np.abs(source[:, :full]).reshape(matrix.shape[0], -1, m)
        kept = (matrix[:, :full] != 0).reshape(magnitude.shape)
        assert np.all(np.where(kept, magnitude, np.inf).min(-1) >= np.where(kept, -np.inf, magnitude).max(-1))
        assert row["max_nonzeros_per_group"] == n
        ragged = matrix.shape[1] - full
        if ragged:
            assert np.all((matrix[:, full:] != 0).sum(-1) == min(n, ragged))
        assert abs(row["sparsity"] - (1 - n / m)) <= 0.01 + ragged / matrix.shape[1]


def test_global_scope_meets_the_total_with_one_threshold():
    model = _model()
    result, details = _run(model, sparsity=0.8, pattern="element", scope="global")
    assert abs(details["achieved_sparsity"] - 0.8) <= 0.01
    before, after = _weights(model), _weights(result)
    pruned = np.concatenate([np.abs(before[n][after[n] == 0]) for n in PRUNED])
    kept = np.concatenate([np.abs(before[n][after[n] != 0]) for n in PRUNED])
    assert pruned.max() <= kept.min()
    layer_sparsities = {row["initializer"]: row["sparsity"] for row in details["layers"]}
    assert layer_sparsities["conv_w"] > 0.9 and layer_sparsities["mm_w"] < 0.7  # small weights go first


def test_exclude_leaves_matching_nodes_dense_and_says_so():
    model = _model()
    result, details = _run(model, sparsity=0.5, pattern="16x1", exclude="^conv$")
    assert {row["initializer"] for row in details["layers"]} == {"fc1_w", "mm_w", "fc2_w"}
    assert {"node": "conv", "op": "Conv", "code": "excluded", "reason": "excluded by pattern"} in details["skipped"]
    assert np.all(_weights(result)["conv_w"] == _weights(model)["conv_w"])


def test_input_model_is_not_modified_and_metadata_is_written():
    model = _model()
    snapshot = model.SerializeToString()
    result, _ = _run(model, sparsity=0.5, pattern="8x8")
    assert model.SerializeToString() == snapshot
    assert any(p.key == METADATA_KEY and '"8x8"' in p.value for p in result.metadata_props)


def test_registered_and_built_from_cli_strings():
    pass_ = get_pass("sparsify").from_spec({"sparsity": "0.9", "pattern": "16x1", "scope": "global"})
    assert (pass_.options.sparsity, str(pass_.pattern), pass_.options.scope) == (0.9, "16x1", "global")


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"pattern": "16y1"}, "pattern='16y1'"),
        ({"pattern": "4:2"}, "pattern='4:2'"),
        ({"pattern": "0x4"}, "pattern='0x4'"),
        ({"sparsity": 1.0}, "sparsity=1.0"),
        ({"sparsity": -0.1}, "sparsity=-0.1"),
        ({"exclude": "("}, "exclude='('"),
    ],
)
def test_bad_options_are_usage_errors(options, fragment):
    with pytest.raises(UsageError, match=fragment.replace("(", r"\(")):
        Sparsify(Sparsify.Options(**options))


def test_model_without_weights_is_a_pass_error():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(PassError, match="nothing to prune"):
        Sparsify().run(model, PassContext())


def test_runs_in_the_pipeline_and_reports_its_deviation():
    from optimizer import optimize

    _, report = optimize(_model(), passes=["sparsify:sparsity=0.5,pattern=8x8"], seed=0)
    entry = report["passes"][0]
    assert entry["details"]["pattern"] == "8x8"
    assert abs(entry["details"]["achieved_sparsity"] - 0.5) <= 0.01


def test_layer_scope_never_zeroes_a_whole_small_layer():
    weight = np.random.default_rng(0).standard_normal((16, 1, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result, details = _run(model, sparsity=0.9, pattern="8x8")
    kept = _weights(result)["w"].reshape(16, 9) != 0
    assert kept.any() and details["layers"][0]["block_sparsity"] < 1.0
