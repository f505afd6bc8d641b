"""Exit codes: each error class maps to one code (2 usage and bad input, 1 failed work), checked through the CLI."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer import errors
from optimizer.cli import main

EXIT_CODES = {
    errors.UsageError: 2,
    errors.ModelError: 2,
    errors.DataError: 2,
    errors.MissingDependency: 2,
    errors.SculptError: 1,
    errors.PassError: 1,
    errors.VerificationError: 1,
    errors.QualityError: 1,
    errors.RuntimeFailure: 1,
    errors.WriteError: 1,
}


def test_every_error_class_is_in_the_table():
    defined = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.SculptError)}
    assert defined == set(EXIT_CODES)
    for cls, code in EXIT_CODES.items():
        assert cls.exit_code == code, cls


def _model(op: str = "Relu", domain: str = "") -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node(op, ["h"], ["y"], domain=domain)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [w])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets)


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    onnx.save(_model(), "m.onnx")
    onnx.save(_model("Frobnicate", "com.example"), "custom.onnx")
    (tmp_path / "text.onnx").write_text("not a model")
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "relu.onnx")
    x = np.random.default_rng(1).standard_normal((32, 4)).astype(np.float32)
    np.savez("cal.npz", x=x)
    x[0, 0] = np.nan
    np.savez("nan.npz", x=x)
    return tmp_path


def _write_fails(monkeypatch):
    import optimizer.model as model_module

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_module.os, "replace", full)


def _exact_pass_changes_outputs(monkeypatch):
    from passes import PassResult
    from passes.cleanup import Cleanup

    def scale(self, model, ctx):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        w = numpy_helper.to_array(out.graph.initializer[0]) * 2
        out.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
        return PassResult(out, {})

    monkeypatch.setattr(Cleanup, "run", scale)


CASES = {  # error class: (command, setup)
    "UsageError": (["m.onnx", "--pass", "shrink", "-o", "o.onnx"], None),
    "ModelError": (["text.onnx", "--pass", "cleanup", "-o", "o.onnx"], None),
    "DataError": (["m.onnx", "--pass", "cleanup", "-o", "o.onnx", "--calibration", "nan.npz"], None),
    "click usage": (["m.onnx", "--pass", "cleanup", "-o", "o.onnx", "--batch", "-3"], None),
    "PassError": (["relu.onnx", "--pass", "sparsify", "-o", "o.onnx", "--calibration", "cal.npz"], None),
    "VerificationError": (["m.onnx", "--pass", "cleanup", "-o", "o.onnx"], _exact_pass_changes_outputs),
    "QualityError": (["m.onnx", "--pass", "sparsify:sparsity=0.9", "--strict", "-o", "o.onnx"], None),
    "RuntimeFailure": (["run", "custom.onnx", "--input", "cal.npz", "--output", "y.npz"], None),
    "WriteError": (["m.onnx", "--pass", "cleanup", "-o", "o.onnx"], _write_fails),
}
EXPECTED = {"UsageError": 2, "ModelError": 2, "DataError": 2, "click usage": 2, "PassError": 1,
            "VerificationError": 1, "QualityError": 1, "RuntimeFailure": 1, "WriteError": 1}


MESSAGES = {"PassError": "nothing to prune", "RuntimeFailure": "onnxruntime cannot load",
            "WriteError": "cannot write", "VerificationError": "is exact but changed",
            "QualityError": "quality floor", "ModelError": "not a readable"}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_exit_code(case, work, capsys, monkeypatch):
    args, setup = CASES[case]
    if setup is not None:
        setup(monkeypatch)
    assert main(args) == EXPECTED[case]
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and sum(line.startswith("error: ") for line in err) == 1, err
    assert "internal error" not in err[-1] and "Traceback" not in "\n".join(err)
    assert MESSAGES.get(case, "") in err[-1]
    assert not (work / "o.onnx").exists() and not (work / "y.npz").exists()
