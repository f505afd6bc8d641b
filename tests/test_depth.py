"""The depth pass: residual blocks found, removed (checked against PyTorch with the branch zeroed) and inserted."""

from __future__ import annotations

import copy
import io
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from sparse_families import FAMILIES, build, sample_input

import optimizer
from optimizer.errors import PassError, UsageError
from optimizer.report import model_stats
from optimizer.verify import run_ort
from passes import PassContext, get_pass
from passes.graph.ir import GraphView
from passes.graph.residual import find_residual_blocks

RESNET = next(f for f in FAMILIES if f.name == "resnet")
MOBILENET = next(f for f in FAMILIES if f.name == "mobilenet")
XVECTOR = next(f for f in FAMILIES if f.name == "xvector")
IMAGE = (1, 3, 16, 16)
CALIBRATION = sample_input((4, 3, 16, 16), seed=5)


def export_dynamic(model: torch.nn.Module, shape: tuple[int, ...]) -> onnx.ModelProto:
    """Like sparse_families.export, with a dynamic batch axis so that one model runs at batch 1, 3 and 4."""
    torch.set_num_threads(1)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(shape),), buffer, opset_version=17, dynamo=False,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "N"}, "output": {0: "N"}})
    return onnx.load_from_string(buffer.getvalue())


def depth(**options):
    return get_pass("depth").from_spec(options)


def module_path(add_name: str) -> str:
    """'/stages/stages.0/stages.0.1/Add' -> 'stages.0.1': the PyTorch module path the exporter put in the name."""
    return add_name.strip("/").split("/")[-2]


@pytest.fixture(scope="module")
def resnet():
    model = build(RESNET, blocks=(2, 1, 2, 1))
    return model, export_dynamic(model, IMAGE)


@pytest.fixture(scope="module")
def mobilenet():
    model = build(MOBILENET)
    return model, export_dynamic(model, IMAGE)


def identity_blocks(torch_model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The residual blocks whose shortcut is the identity, by module path, read off the PyTorch modules."""
    found = {}
    for name, module in torch_model.named_modules():
        if hasattr(module, "down") and module.down is None or getattr(module, "residual", False):
            found[name] = module
    return found


def projection_blocks(torch_model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in torch_model.named_modules() if getattr(m, "down", None) is not None}


def branch_params(block: torch.nn.Module) -> int:
    """Params of the residual branch once the exporter folded every BatchNorm into its conv (one bias each)."""
    convs = sum(p.numel() for m in block.modules() if isinstance(m, torch.nn.Conv2d) for p in m.parameters())
    norms = sum(m.num_features for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d))
    return convs + norms


def zero_branch(torch_model: torch.nn.Module, path: str) -> torch.nn.Module:
    """Reference: a copy whose block at `path` has its branch's last BatchNorm output exactly 0."""
    reference = copy.deepcopy(torch_model)
    block = reference.get_submodule(path)
    last_norm = block.bn2 if hasattr(block, "bn2") else block.bn_p
    with torch.no_grad():
        last_norm.weight.zero_()
        last_norm.bias.zero_()
    return reference


def measured_importance(torch_model: torch.nn.Module, blocks: dict[str, torch.nn.Module]) -> dict[str, float]:
    """RMS(branch) / RMS(block input) per block, observed with PyTorch hooks on the calibration batch."""
    seen = {}
    hooks = []
    for path, block in blocks.items():
        last_norm = block.bn2 if hasattr(block, "bn2") else block.bn_p
        hooks.append(block.register_forward_pre_hook(lambda m, a, p=path: seen.__setitem__((p, "x"), a[0])))
        hooks.append(last_norm.register_forward_hook(lambda m, a, out, p=path: seen.__setitem__((p, "f"), out)))
    with torch.no_grad():
        torch_model(torch.from_numpy(CALIBRATION["input"]))
    for hook in hooks:
        hook.remove()
    rms = {key: float(value.double().square().mean().sqrt()) for key, value in seen.items()}
    return {path: rms[(path, "f")] / rms[(path, "x")] for path in blocks}


# --- 1. the finder ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["resnet", "mobilenet"])
def test_finder_lists_identity_blocks_and_declines_projections(family, request):
    torch_model, model = request.getfixturevalue(family)
    blocks, declined = find_residual_blocks(GraphView(model))
    expected = identity_blocks(torch_model)
    assert sorted(module_path(b.name) for b in blocks) == sorted(expected)
    assert len(blocks) == (3 if family == "resnet" else 2)  # (2,1,2,1) blocks: stages 0, 0 and 2 keep the shape
    projections = projection_blocks(torch_model)
    assert sorted(module_path(d.node) for d in declined) == sorted(projections)
    for entry in declined:
        assert entry.code == "projection-shortcut" and entry.why.startswith("projection shortcut")
        assert f"{module_path(entry.node)}/down/Conv" in entry.why


# --- 2. removal against PyTorch with the branch zeroed ------------------------------------------------------

def check_removal(torch_model, model, options, expect_path=None):
    result, details = depth(**options).run(model, PassContext(calibration=CALIBRATION, calibration_is_random=False))
    onnx.checker.check_model(result, full_check=True)
    assert len(details["removed"]) == 1
    removed = details["removed"][0]
    path = module_path(removed)
    if expect_path is not None:
        assert path == expect_path
    row = next(r for r in details["blocks"] if r["block"] == removed)
    block = identity_blocks(torch_model)[path]

    assert len(model.graph.node) - len(result.graph.node) == len(row["branch_nodes"]) + 1
    before, after = model_stats(model), model_stats(result)
    assert before["params"] - after["params"] == row["params"] == branch_params(block)
    assert (details["before"]["params"], details["after"]["params"]) == (before["params"], after["params"])
    assert [(i.name, str(i.type)) for i in result.graph.input] == [(i.name, str(i.type)) for i in model.graph.input]
    assert [(o.name, str(o.type)) for o in result.graph.output] == [
        (o.name, str(o.type)) for o in model.graph.output]

    feeds = sample_input((3, 3, 16, 16), seed=9)
    reference = run_ort(export_dynamic(zero_branch(torch_model, path), IMAGE), feeds)["output"]
    got = run_ort(result, feeds)["output"]
    original = run_ort(model, feeds)["output"]
    assert np.abs(got - reference).max() <= 1e-5
    assert np.abs(got - original).max() > 1e-3  # the block did matter: the comparison is not vacuous
    entries = json.loads(next(p.value for p in result.metadata_props if p.key == "sculpt.depth"))
    assert entries == [{"mode": "remove", "block": removed, "skip": row["skip"],
                        "branch_nodes": len(row["branch_nodes"]), "importance": row["importance"]}]
    return details


@pytest.mark.parametrize("family", ["resnet", "mobilenet"])
def test_remove_least_important_block_matches_zeroed_branch(family, request):
    torch_model, model = request.getfixturevalue(family)
    expected = measured_importance(torch_model, identity_blocks(torch_model))
    weakest = min(expected, key=expected.get)
    details = check_removal(torch_model, model, {"count": 1}, expect_path=weakest)
    for row in details["blocks"]:
        assert row["importance"] == pytest.approx(expected[module_path(row["block"])], rel=1e-4)


@pytest.mark.parametrize(("family", "regex", "path"), [("resnet", r"stages\.0\.1/Add$", "stages.0.1"),
                                                       ("mobilenet", r"blocks\.2/Add", "blocks.2")])
def test_remove_by_regex_matches_zeroed_branch(family, regex, path, request):
    torch_model, model = request.getfixturevalue(family)
    check_removal(torch_model, model, {"blocks": regex}, expect_path=path)


def test_remove_two_adjacent_blocks_by_regex(resnet):
    torch_model, model = resnet
    result, details = depth(blocks=r"stages\.0\.\d/Add").run(model, PassContext(calibration=CALIBRATION))
    assert [module_path(n) for n in details["removed"]] == ["stages.0.0", "stages.0.1"]
    reference = copy.deepcopy(torch_model)
    for path in ("stages.0.0", "stages.0.1"):
        reference = zero_branch(reference, path)
    feeds = sample_input((2, 3, 16, 16), seed=4)
    expected = run_ort(export_dynamic(reference, IMAGE), feeds)["output"]
    assert np.abs(run_ort(result, feeds)["output"] - expected).max() <= 1e-5


def nested_model(inner: bool = True) -> onnx.ModelProto:
    """y = r0 + c3(r1 + c2(r1)), r1 = relu(c1(r0)), r0 = relu(x): a block nested in another, ending in a graph output.

    inner=False gives the same graph with the inner block already replaced by r1 (the expected removal)."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.3, f"w{i}")
               for i in (1, 2, 3)]
    conv = {"pads": [1, 1, 1, 1]}
    nodes = [helper.make_node("Relu", ["x"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1", **conv),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1")]
    if inner:
        nodes += [helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", **conv),
                  helper.make_node("Add", ["r1", "c2"], ["a1"], name="inner_add")]
    nodes += [helper.make_node("Conv", ["a1" if inner else "r1", "w3"], ["c3"], name="conv3", **conv),
              helper.make_node("Add", ["c3", "r0"], ["y"], name="outer_add")]
    value = {name: helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [2, 4, 6, 6]) for name in "xy"}
    graph = helper.make_graph(nodes, "nested", [value["x"]], [value["y"]],
                              weights if inner else [weights[0], weights[2]])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_nested_blocks_and_a_block_ending_in_the_graph_output():
    model = nested_model()
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 4, 6, 6)).astype(np.float32)}
    blocks, _ = find_residual_blocks(GraphView(model))
    assert [(b.name, b.skip, [n.name for n in b.nodes]) for b in blocks] == [
        ("inner_add", "r1", ["conv2"]),
        ("outer_add", "r0", ["conv1", "relu1", "conv2", "inner_add", "conv3"])]

    inner, _ = depth(blocks="inner").run(model, PassContext(calibration=feeds))
    onnx.checker.check_model(inner, full_check=True)
    assert np.abs(run_ort(inner, feeds)["y"] - run_ort(nested_model(inner=False), feeds)["y"]).max() <= 1e-6

    both, details = depth(blocks="_add").run(model, PassContext(calibration=feeds))
    onnx.checker.check_model(both, full_check=True)
    assert details["removed"] == ["outer_add"]  # the inner block goes with its enclosing one
    assert [n.op_type for n in both.graph.node] == ["Relu", "Identity"]
    assert [o.name for o in both.graph.output] == ["y"]
    assert np.array_equal(run_ort(both, feeds)["y"], np.maximum(feeds["x"], 0))


def test_insert_after_a_graph_output_keeps_its_name():
    model = nested_model(inner=False)
    result, details = depth(mode="insert", after="y").run(model, PassContext())
    onnx.checker.check_model(result, full_check=True)
    assert [o.name for o in result.graph.output] == ["y"]
    assert details["inserted"][0]["after"] == "y"
    assert next(n for n in result.graph.node if n.output[0] == "y").name == "depth/insert0/add"
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 4, 6, 6)).astype(np.float32)}
    assert np.abs(run_ort(result, feeds)["y"] - run_ort(model, feeds)["y"]).max() <= 1e-6


# --- 3. insertion is exact ----------------------------------------------------------------------------------

def conv_weights(model: onnx.ModelProto, prefix: str) -> list[np.ndarray]:
    return [numpy_helper.to_array(t) for t in model.graph.initializer
            if t.name.startswith(prefix) and t.name.endswith("/weight")]


def test_insert_is_exact_and_adds_trainable_blocks(resnet):
    _, model = resnet
    one, details = depth(mode="insert", after="/Relu_output_0").run(model, PassContext(seed=0))
    two, _ = depth(mode="insert", after="/Relu_output_0", count=2).run(model, PassContext(seed=0))
    other_seed, _ = depth(mode="insert", after="/Relu_output_0").run(model, PassContext(seed=1))
    for result in (one, two):
        onnx.checker.check_model(result, full_check=True)
        for batch in (1, 3):
            feeds = sample_input((batch, 3, 16, 16), seed=batch)
            assert np.abs(run_ort(result, feeds)["output"] - run_ort(model, feeds)["output"]).max() <= 1e-6
    assert len(one.graph.node) - len(model.graph.node) == 6
    assert len(two.graph.node) - len(model.graph.node) == 12
    assert [b["block"] for b in details["inserted"][0]["blocks"]] == ["depth/insert0"]
    ops = {n.name: n.op_type for n in two.graph.node if n.name.startswith("depth/")}
    assert sorted(ops) == sorted(f"depth/insert{i}/{n}" for i in (0, 1)
                                 for n in ("conv1", "bn1", "relu", "conv2", "bn2", "add"))
    weights = conv_weights(one, "depth/insert0/")
    assert [w.shape for w in weights] == [(8, 8, 3, 3)] * 2
    assert all(np.abs(w).min() > 0 for w in weights)
    assert np.std(weights[0]) == pytest.approx(np.sqrt(2 / 72), rel=0.2)  # He-normal
    assert all(not np.array_equal(a, b) for a, b in zip(weights, conv_weights(other_seed, "depth/insert0/"),
                                                        strict=True))
    assert model_stats(one)["params"] - model_stats(model)["params"] == 2 * 8 * 8 * 9 + 8 * 8
    meta = json.loads(next(p.value for p in two.metadata_props if p.key == "sculpt.depth"))
    assert [(m["mode"], m["block"], m["after"]) for m in meta] == [
        ("insert", "depth/insert0", "/Relu_output_0"), ("insert", "depth/insert1", "/Relu_output_0")]


def test_insert_by_node_regex_with_width_and_conv1d():
    torch_model = build(XVECTOR)
    model = export_dynamic(torch_model, (1, 8, 40))
    first_relu = next(n for n in model.graph.node if n.op_type == "Relu")
    result, details = depth(mode="insert", after=f"^{first_relu.name}$", width=4).run(model, PassContext())
    onnx.checker.check_model(result, full_check=True)
    assert details["inserted"][0]["after"] == first_relu.output[0]
    assert [w.shape for w in conv_weights(result, "depth/insert0/")] == [(4, 16, 3), (16, 4, 3)]
    feeds = {"input": np.random.default_rng(2).standard_normal((3, 8, 40)).astype(np.float32)}
    assert np.abs(run_ort(result, feeds)["output"] - run_ort(model, feeds)["output"]).max() <= 1e-6


# --- 4. through the pipeline --------------------------------------------------------------------------------

def test_pipeline_contracts(resnet):
    _, model = resnet
    _, report = optimizer.optimize(model, ["depth:mode=insert,after=/Relu_output_0"])
    entry = report["passes"][0]
    assert entry["contract"] == "exact"
    assert entry["verify"]["max_rel_err"] <= 1e-6
    _, report = optimizer.optimize(model, ["depth:mode=remove,count=1"], calibration=CALIBRATION)
    assert report["passes"][0]["contract"] == "approximate"
    assert report["output"]["nodes"] == report["input"]["nodes"] - 4


# --- 5. errors ----------------------------------------------------------------------------------------------

def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize(("options", "names"), [
    ({"mode": "grow"}, "mode='grow'"),
    ({"blocks": "Add", "count": "1"}, "blocks="),
    ({"count": "0"}, "count=0"),
    ({"mode": "insert"}, "after="),
    ({"mode": "insert", "after": "x", "blocks": "Add"}, "blocks='Add'"),
])
def test_bad_options_are_usage_errors(options, names):
    with pytest.raises(UsageError) as error:
        depth(**options)
    assert names in one_line(error)


@pytest.mark.parametrize(("options", "names"), [
    ({"mode": "insert", "after": "no_such_tensor"}, "after='no_such_tensor'"),
    ({"mode": "insert", "after": "/ReduceMean_output_0"}, "2-D"),
    ({"mode": "insert", "after": "input"}, "not produced by a node"),
    ({"blocks": "nothing_matches"}, "/stages/stages.0/stages.0.0/Add"),
    ({"count": "4"}, "count=4"),
])
def test_bad_targets_are_usage_errors(resnet, options, names):
    _, model = resnet
    with pytest.raises(UsageError) as error:
        depth(**options).run(model, PassContext(calibration=CALIBRATION))
    assert names in one_line(error)


def test_no_residual_block_is_a_pass_error():
    weight = numpy_helper.from_array(np.ones((4, 4, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["a"], ["b"], name="relu"),
         helper.make_node("Conv", ["b", "w"], ["y"], name="conv2", pads=[1, 1, 1, 1])],
        "plain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 6, 6])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(PassError) as error:
        depth(count=1).run(model, PassContext())
    assert "no identity residual block was found" in one_line(error)
