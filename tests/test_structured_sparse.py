"""structured-sparse on the six model families: exact removal of zeroed channels, ratio pruning, the pipeline."""

from __future__ import annotations

import functools
import math

import numpy as np
import onnx
import pytest
from channel_graphs import io_shapes, relative_change, run
from onnx import numpy_helper
from sparse_families import FAMILIES, build, export, sample_input, zero_fraction

from optimizer import optimize
from optimizer.pipeline import write_artifacts
from passes import PassContext
from passes.structured_sparse import StructuredSparse

FAMILY = {f.name: f for f in FAMILIES}
RESIDUAL = [f.name for f in FAMILIES if f.residual]


@functools.cache
def family_model(name: str, zeroed: bool = False, seed: int = 0) -> tuple[onnx.ModelProto, int]:
    """The exported family model and how many channels were zeroed (30% of every group) before export."""
    family = FAMILY[name]
    model = build(family, seed=seed)
    count = zero_fraction(model.zero_groups(), 0.3, seed=seed) if zeroed else 0
    return export(model, family.input_shape), count


def feeds_for(name: str, seed: int = 1) -> dict[str, np.ndarray]:
    return sample_input(FAMILY[name].input_shape, seed)


def float_params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)


def run_pass(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, dict, PassContext]:
    ctx = PassContext()
    result = StructuredSparse(StructuredSparse.Options(**options)).run(model, ctx)
    write_artifacts(result.artifacts)
    new, details = result
    onnx.checker.check_model(new, full_check=True)
    assert io_shapes(new) == io_shapes(model)
    return new, details, ctx


@pytest.mark.parametrize("name", FAMILY)
def test_zero_criterion_removes_every_zeroed_channel_exactly(name):
    model, zeroed = family_model(name, zeroed=True)
    new, details, _ = run_pass(model, criterion="zero")
    summary = details["summary"]
    assert summary["channels_before"] - summary["channels_after"] == zeroed
    assert all(g["exact"] for g in details["groups"] if g["status"] == "pruned")
    for seed in (1, 2):
        feeds = feeds_for(name, seed)
        assert relative_change(run(model, feeds), run(new, feeds)) <= 1e-4
    assert float_params(new) < float_params(model)


@pytest.mark.parametrize("name", FAMILY)
def test_half_ratio_gives_a_valid_smaller_model(name):
    model, _ = family_model(name)
    new, details, _ = run_pass(model, ratio=0.5)
    outputs = run(new, feeds_for(name))
    assert all(np.isfinite(o).all() for o in outputs)
    assert [o.shape for o in outputs] == [o.shape for o in run(model, feeds_for(name))]
    ratio = float_params(new) / float_params(model)
    assert ratio < 0.8
    if name in RESIDUAL:
        assert ratio <= 0.40
    assert details["summary"]["params_after"] == float_params(new)


def test_zero_criterion_through_the_pipeline_is_verified_exact():
    model, zeroed = family_model("resnet", zeroed=True)
    pruned, report = optimize(model, ["structured-sparse:criterion=zero"])
    entry = report["passes"][0]
    assert entry["contract"] == "exact" and entry["verify"]["max_rel_err"] <= 1e-4
    assert entry["details"]["summary"]["channels_before"] - entry["details"]["summary"]["channels_after"] == zeroed
    _, report = optimize(model, [("structured-sparse", {"ratio": 0.5, "criterion": "l2"})])
    assert report["passes"][0]["contract"] == "approximate"


def test_uniform_l1_keeps_the_largest_rows_of_each_group():
    model, _ = family_model("resnet")
    _, details, _ = run_pass(model, ratio=0.5)
    name = "/stages/stages.1/stages.1.0/conv1/Conv"
    conv = next(n for n in model.graph.node if n.name == name)
    weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == conv.input[1]))
    l1 = np.abs(weight).reshape(weight.shape[0], -1).sum(axis=1)
    entry = next(g for g in details["groups"] if g["name"] == name)
    assert entry["kept"] == sorted(np.argsort(-l1)[: entry["channels_after"]].tolist())
    assert entry["channels_after"] == 8 and entry["importance"]["removed_max"] <= entry["importance"]["kept_min"]


def test_bn_scale_ranks_by_gamma_of_every_normalization_on_the_channel():
    torch_model = build(FAMILY["dense_inception"])
    model = export(torch_model, FAMILY["dense_inception"].input_shape)
    _, details, _ = run_pass(model, ratio=0.5, criterion="bn-scale")
    gammas = [torch_model.layer1.bn1, torch_model.layer2.bn1, torch_model.trans_bn]
    mean_gamma = np.mean([bn.weight.detach().numpy()[:8] for bn in gammas], axis=0)
    stem = next(g for g in details["groups"] if g["name"] == "/stem/Conv")
    assert stem["kept"] == sorted(np.argsort(-mean_gamma)[:4].tolist())
    assert "note" not in stem["importance"]
    fallback = next(g for g in details["groups"] if g["name"] == "/b2a/Conv")  # no normalization reaches it
    assert "l2 norm" in fallback["importance"]["note"]


def test_global_scope_round_to_and_min_channels():
    model, _ = family_model("resnet")
    _, details, _ = run_pass(model, ratio=0.5, scope="global")
    prunable = [g for g in details["groups"] if g["status"] != "declined"]
    removed = sum(g["channels_before"] - g["channels_after"] for g in prunable)
    assert removed == math.floor(0.5 * sum(g["channels_before"] for g in prunable))
    assert len({g["channels_after"] / g["channels_before"] for g in prunable}) > 1  # not uniform
    _, details, _ = run_pass(model, ratio=0.5, round_to=4)
    assert all(g["channels_after"] % 4 == 0 for g in details["groups"] if g["status"] == "pruned")
    _, details, _ = run_pass(model, ratio=0.9, min_channels=6)
    assert min(g["channels_after"] for g in details["groups"] if g["status"] == "pruned") == 6


@pytest.mark.parametrize("criterion", ["l2", "hoyer"])
def test_other_criteria_give_valid_models(criterion):
    model, _ = family_model("xvector")
    new, details, _ = run_pass(model, ratio=0.3, criterion=criterion, scope="global")
    assert details["summary"]["channels_after"] < details["summary"]["channels_before"]
    run(new, feeds_for("xvector"))


def test_report_lists_members_kept_maps_and_reasons():
    model, _ = family_model("transformer")
    new, details, _ = run_pass(model, ratio=0.5)
    for group in details["groups"]:
        assert group["members"] and group["status"] in ("pruned", "declined", "unchanged")
        if group["status"] == "pruned":
            assert len(group["kept"]) == group["channels_after"] < group["channels_before"]
            assert all(0 <= i < group["channels_before"] for i in group["kept"])
        if group["status"] == "declined":
            assert group["reason"]
    declined = [g for g in details["groups"] if g["status"] == "declined"]
    assert any("LayerNormalization" in g["reason"] for g in declined)
    ffn = next(g for g in details["groups"] if g["name"].endswith("layers.0/linear1/MatMul"))
    consumer = next(m for m in ffn["members"] if m["role"] == "consumes")
    assert (consumer["before"], consumer["after"]) == (32, 16)


def test_plan_round_trip_on_a_re_export(tmp_path):
    model, _ = family_model("resnet")
    plan = tmp_path / "plan.json"
    direct, details, _ = run_pass(model, ratio=0.5, plan_out=str(plan))
    replayed, replay_details, _ = run_pass(model, plan=str(plan))
    feeds = feeds_for("resnet")
    assert relative_change(run(direct, feeds), run(replayed, feeds)) == 0
    other_weights, _ = family_model("resnet", seed=5)
    _, other, _ = run_pass(other_weights, plan=str(plan))
    kept = {g["name"]: g.get("kept") for g in details["groups"]}
    assert {g["name"]: g.get("kept") for g in other["groups"]} == kept == \
        {g["name"]: g.get("kept") for g in replay_details["groups"]}


def test_bad_options_are_usage_errors(tmp_path):
    from optimizer.errors import UsageError

    for ratio in ("1.0", "-0.1", "1.5"):
        with pytest.raises(UsageError, match="ratio"):
            StructuredSparse.from_spec({"ratio": ratio})
    with pytest.raises(UsageError, match="criterion"):
        StructuredSparse.from_spec({"criterion": "magic"})
    with pytest.raises(UsageError, match="criterion"):
        StructuredSparse(StructuredSparse.Options(criterion="magic"))
    with pytest.raises(UsageError, match="plan=.*no such file"):
        StructuredSparse.from_spec({"plan": str(tmp_path / "missing.json")})
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(UsageError, match="plan"):
        StructuredSparse.from_spec({"plan": str(tmp_path / "junk.json")})
    plan = tmp_path / "plan.json"
    run_pass(family_model("resnet")[0], ratio=0.5, plan_out=str(plan))
    with pytest.raises(UsageError, match="plan=.*different model"):
        run_pass(family_model("mobilenet")[0], plan=str(plan))


def test_exclude_keeps_matching_groups_and_warns_when_nothing_matches():
    model, _ = family_model("resnet")
    _, details, ctx = run_pass(model, ratio=0.5, exclude="stages.3")
    excluded = [g for g in details["groups"] if g["status"] == "excluded"]
    assert excluded and all("stages.3" in "".join(g["producers"]) for g in excluded)
    assert all(g["channels_after"] == g["channels_before"] for g in excluded)
    assert not ctx.warnings
    _, _, ctx = run_pass(model, ratio=0.5, exclude="no_such_layer")
    assert any("exclude='no_such_layer' matches no group" in w for w in ctx.warnings)


def test_a_model_with_no_prunable_group_is_returned_unchanged():
    from channel_graphs import GraphBuilder

    b = GraphBuilder((1, 3, 8, 8))
    model = b.model([b.op("Relu", [b.conv("input", 3, 4)])])
    new, details, ctx = run_pass(model, ratio=0.5)
    assert new.SerializeToString() == model.SerializeToString()
    assert "no prunable channel group" in details["message"] and ctx.warnings
    assert details["groups"][0]["reason"].startswith("graph output")


def test_older_exports_with_weights_listed_as_inputs():
    """opset 11, keep_initializers_as_inputs: weights are graph inputs too; they are still pruned as constants."""
    import io
    import warnings

    import torch

    net = build(FAMILY["shufflenet"])
    zeroed = zero_fraction(net.zero_groups(), 0.3, seed=0)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(FAMILY["shufflenet"].input_shape),), buffer, opset_version=11,
                          dynamo=False, input_names=["input"], output_names=["output"],
                          keep_initializers_as_inputs=True)
    model = onnx.load_from_string(buffer.getvalue())
    ctx = PassContext()
    new, details = StructuredSparse(StructuredSparse.Options(criterion="zero")).run(model, ctx)
    onnx.checker.check_model(new, full_check=True)
    assert [i.name for i in new.graph.input] == ["input"]
    assert details["summary"]["channels_before"] - details["summary"]["channels_after"] == zeroed
    feeds = feeds_for("shufflenet")
    assert relative_change(run(model, feeds), run(new, feeds)) <= 1e-4
