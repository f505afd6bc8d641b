"""Output-path safety: every data-loss case of issue 16 is refused with exit 2, and every input keeps its bytes."""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.cli import main


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 64)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((64, 4)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def files(tmp_path, monkeypatch):
    """m.onnx, ext.onnx (+ ext.onnx.data), cal.npz in tmp_path, which is also the working directory."""
    monkeypatch.chdir(tmp_path)
    model = _mlp()
    onnx.save(model, "m.onnx")
    onnx.save_model(_mlp(), "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    np.savez("cal.npz", x=np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32))
    return tmp_path


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


DATA_LOSS_CASES = {
    "--report onto the input model": ["m.onnx", "--pass", "cleanup", "-o", "o.onnx", "--report", "m.onnx"],
    "--plan-out onto the input model": ["m.onnx", "--pass", "structured-sparse:ratio=0.5", "-o", "o.onnx",
                                        "--plan-out", "m.onnx"],
    "plan_out= onto the input model": ["m.onnx", "--pass", "structured-sparse:ratio=0.5,plan_out=m.onnx",
                                       "-o", "o.onnx"],
    "inspect --report onto the model": ["inspect", "m.onnx", "--report", "m.onnx"],
    "run --output onto the model": ["run", "m.onnx", "--input", "cal.npz", "--output", "m.onnx"],
    "run --output onto its input": ["run", "m.onnx", "--input", "cal.npz", "--output", "cal.npz"],
    "-o onto the calibration file": ["m.onnx", "--pass", "cleanup", "-o", "cal.npz", "--calibration", "cal.npz"],
    "-o onto the input's external data": ["ext.onnx", "--pass", "cleanup", "-o", "ext.onnx.data"],
    "-o onto the input model": ["m.onnx", "--pass", "cleanup", "-o", "./m.onnx"],
    "-o DIR/ resolving to the input": ["m.onnx", "--pass", "cleanup", "-o", "./"],
    "--report onto -o": ["m.onnx", "--pass", "cleanup", "-o", "o.onnx", "--report", "o.onnx"],
    "-o into a missing DIR/": ["m.onnx", "--pass", "cleanup", "-o", "newdir/"],
    "bench --report onto a model": ["bench", "m.onnx", "--report", "m.onnx"],
    "sensitivity --report onto --eval": ["sensitivity", "m.onnx", "--eval", "cal.npz", "--report", "cal.npz"],
}


@pytest.mark.parametrize("case", sorted(DATA_LOSS_CASES))
def test_data_loss_case_is_refused_and_inputs_unchanged(case, files, capsys):
    before = _snapshot(files)
    assert main(DATA_LOSS_CASES[case]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    assert _snapshot(files) == before  # nothing changed, nothing new (no partial output, no temp files)


def test_symlink_to_the_input_is_refused(files, capsys):
    os.symlink("m.onnx", "alias.onnx")
    before = _snapshot(files)
    assert main(["m.onnx", "--pass", "cleanup", "-o", "o.onnx", "--report", "alias.onnx"]) == 2
    assert "would overwrite the input model" in capsys.readouterr().err
    assert _snapshot(files) == before


def test_output_dir_slash_writes_dir_model_name(files):
    (files / "out").mkdir()
    assert main(["m.onnx", "--pass", "cleanup", "-o", "out/"]) == 0
    assert (files / "out" / "m.onnx").is_file() and not (files / "out" / "out").exists()


def test_report_folder_not_writable_is_refused_before_the_model_is_written(files, capsys):
    locked = files / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    # root ignores folder permissions; /proc refuses new files for everyone
    report = "/proc/sculpt-report.json" if os.geteuid() == 0 else str(locked / "r.json")
    try:
        assert main(["m.onnx", "--pass", "cleanup", "-o", "o.onnx", "--report", report]) == 2
    finally:
        locked.chmod(0o755)
    assert "not writable" in capsys.readouterr().err
    assert not (files / "o.onnx").exists()


def test_external_data_output_twice_replaces_the_old_data(files):
    (files / "out").mkdir()
    for _ in range(2):
        assert main(["ext.onnx", "--pass", "cleanup", "-o", "out/c.onnx"]) == 0
    assert sorted(p.name for p in (files / "out").iterdir()) == ["c.onnx", "c.onnx.data"]
    assert oct((files / "out" / "c.onnx.data").stat().st_mode & 0o077) != "0o0"  # an ordinary file, not 0600
    from optimizer.verify import run_ort

    feeds = {"x": np.ones((2, 8), np.float32)}
    np.testing.assert_allclose(run_ort(onnx.load("out/c.onnx"), feeds)["y"], run_ort(_mlp(), feeds)["y"], rtol=1e-6)


def test_save_model_restores_old_data_when_the_model_rename_fails(files, monkeypatch):
    from optimizer import model as model_module
    from optimizer.errors import WriteError

    (files / "out").mkdir()
    assert main(["ext.onnx", "--pass", "cleanup", "-o", "out/c.onnx"]) == 0
    before = _snapshot(files / "out")
    real_replace = os.replace

    def failing(src, dst):
        if str(dst).endswith("c.onnx"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(model_module.os, "replace", failing)
    with pytest.raises(WriteError, match="No space left"):
        model_module.save_model(_mlp(), files / "out" / "c.onnx", external=True)
    assert _snapshot(files / "out") == before
    assert sorted(p.name for p in (files / "out").iterdir()) == ["c.onnx", "c.onnx.data"]
