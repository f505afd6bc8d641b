"""Artifacts (keys, plans, plots) are data until the whole run has verified; option classes are frozen."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.cli import main
from optimizer.morph import load_key
from passes import Pass, all_passes, option, register


def small_cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((8, 1, 3, 3)).astype(np.float32),
        "b1": rng.standard_normal(8).astype(np.float32),
        "w2": rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.3,
        "fc": rng.standard_normal((4, 8)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def files(tmp_path):
    model = tmp_path / "in.onnx"
    onnx.save(small_cnn(), model)
    names = ("out.onnx", "plan.json", "key.npz", "slices.png")
    return model, dict(zip(("out", "plan", "key", "plot"), (tmp_path / n for n in names), strict=True))


def _argv(model, paths, tolerance: str) -> list[str]:
    return [str(model), "--pass", f"structured-sparse:ratio=0.5,plan_out={paths['plan']}",
            "--pass", f"mole:key_out={paths['key']},seed=1", "--pass", "quantize",
            "--pass", f"bit-slice:plot={paths['plot']}", "-o", str(paths["out"]), "--tolerance", tolerance]


def test_a_run_whose_second_pass_fails_verification_writes_nothing(files, capsys):
    model, paths = files
    assert main(_argv(model, paths, "0")) == 1  # mole is exact; float rounding of x @ M is above tolerance 0
    assert "pass mole is exact but changed the outputs" in capsys.readouterr().err
    assert [p.name for p in paths.values() if p.exists()] == []
    assert sorted(p.name for p in model.parent.iterdir()) == ["in.onnx"]  # no temporary files left either


def test_the_same_run_passing_verification_writes_every_artifact(files):
    model, paths = files
    assert main(_argv(model, paths, "1e-4")) == 0
    out = onnx.load(paths["out"])
    key = load_key(paths["key"])
    stored = next(p.value for p in out.metadata_props if p.key == "sculpt.mole")
    assert key.fingerprint() in stored
    assert paths["plan"].read_text().startswith("{") and '"groups"' in paths["plan"].read_text()
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_registered_pass_has_frozen_options():
    registry = all_passes()
    assert len(registry) >= 8
    for name, cls in registry.items():
        assert dataclasses.is_dataclass(cls.Options), name
        assert cls.Options.__dataclass_params__.frozen, name
        with pytest.raises(dataclasses.FrozenInstanceError):
            first = dataclasses.fields(cls.Options)[0].name
            setattr(cls.Options(), first, None)




def test_register_refuses_mutable_options():
    class Mutable(Pass):
        name = "mutable-options"
        summary = "a pass whose options could change after validation"
        contract = "exact"

        @dataclasses.dataclass
        class Options:
            level: int = option(1, "a level")

    with pytest.raises(RuntimeError, match="frozen dataclass"):
        register(Mutable)
    assert "mutable-options" not in all_passes()
