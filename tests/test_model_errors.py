"""Corrupt or unusual models end in one typed line: invalid UTF-8 names, opset 99, ORT's C++ messages and logs."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.cli import main
from optimizer.errors import first_line
from tests.fuzz_engine import _mlp


def _last_error(text: str) -> str:
    lines = text.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "internal error" not in lines[-1], lines
    assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in text
    return lines[-1]


@pytest.mark.parametrize("command", ["inspect", "apply", "run"])
def test_name_that_is_not_utf8_is_a_model_error(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = _mlp()
    model.graph.node[1].name = "QQQQQQ"
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString().replace(b"QQQQQQ", b"\xff\xfe\xc3\x28\xa0\xa1"))
    np.savez("x.npz", x=np.zeros((2, 6), np.float32))
    args = {"inspect": ["inspect", "m.onnx"], "apply": ["m.onnx", "--pass", "cleanup", "-o", "o.onnx"],
            "run": ["run", "m.onnx", "--input", "x.npz", "--output", "y.npz"]}[command]
    assert main(args) == 2
    assert "node #1 has a name, op type or tensor name that is not valid UTF-8" in _last_error(capsys.readouterr().err)


def test_opset_99_is_one_short_line(tmp_path, capsys):
    model = _mlp()
    model.opset_import[0].version = 99
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["inspect", str(tmp_path / "m.onnx")]) == 2
    line = _last_error(capsys.readouterr().err)
    assert "opset 99 is newer than the newest this onnx supports" in line and len(line) < 200


def test_ort_messages_lose_the_cpp_signature():
    raw = ("[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/graph/model_load_utils.h:46 void "
           "onnxruntime::model_load_utils::ValidateOpsetForDomain(const std::unordered_map<std::__cxx11::basic_string"
           "<char>, int>&, const onnxruntime::logging::Logger&, bool, const std::string&, int) ONNX Runtime only "
           "*guarantees* support for models stamped with official released onnx opset versions.")
    assert first_line(Exception(raw)) == (
        "FAIL: ONNX Runtime only *guarantees* support for models stamped with official released onnx opset versions.")
    assert first_line(Exception("Nodes must be sorted, however input 'w' of node:\nname: fc OpType: MatMul")) == (
        "Nodes must be sorted, however input 'w' of node: name: fc OpType: MatMul")


def test_ort_logs_nothing_on_stderr_when_a_run_fails(tmp_path, capfd):
    """A Gemm whose bias does not broadcast fails inside ORT at run time; ORT logs that itself unless told not to."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b")]
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "g.onnx")
    np.savez(tmp_path / "x.npz", x=np.ones((2, 4), np.float32))
    code = main(["run", str(tmp_path / "g.onnx"), "--input", str(tmp_path / "x.npz"), "--output",
                 str(tmp_path / "y.npz")])
    assert code in (1, 2)
    err = capfd.readouterr().err
    line = _last_error(err)
    assert "onnxruntime" in line and "\x1b[" not in err and "[E:onnxruntime" not in err


@pytest.mark.parametrize("command", ["inspect", "apply"])
def test_initializer_with_an_unknown_element_type_is_a_model_error(command, tmp_path, monkeypatch, capsys):
    # found by the long fuzz run: a flipped byte turned an overridable default's data_type into 94
    monkeypatch.chdir(tmp_path)
    model = _mlp()
    model.graph.initializer[0].data_type = 94
    onnx.save(model, tmp_path / "m.onnx")
    args = {"inspect": ["inspect", "m.onnx"], "apply": ["m.onnx", "--pass", "cleanup", "-o", "o.onnx"]}[command]
    assert main(args) == 2
    name = model.graph.initializer[0].name
    assert f"initializer {name!r} has unknown element type code 94" in _last_error(capsys.readouterr().err)
    assert not (tmp_path / "o.onnx").exists()
