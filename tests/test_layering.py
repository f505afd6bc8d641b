"""Layers: the ground floor imports nothing above it; the CLI loads each command lazily; pass modules touch no files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from optimizer.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
GROUND_FLOOR = ["errors", "model", "normalize", "rnn", "data", "quant", "declines", "options", "io_json", "keys",
                "ort_session", "verify", "timing", "plots", "morph", "report", "activation_stats", "paths",
                "overridable"]
ABOVE = ("passes", "runtimes", "torch", "tvm")


def loaded_after(statement: str) -> list[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return json.loads(run.stdout.splitlines()[-1])


def test_ground_floor_modules_import_nothing_from_passes_runtimes_torch_or_tvm():
    statement = "\n".join(f"import optimizer.{name}" for name in GROUND_FLOOR)
    upward = [m for m in loaded_after(statement) if m.split(".")[0] in ABOVE]
    assert upward == []


@pytest.mark.parametrize("statement", ["import optimizer", "import optimizer.cli",
                                       "from optimizer.cli import main; main(['--help'])"])
def test_the_entry_points_load_neither_torch_nor_tvm(statement):
    heavy = [m for m in loaded_after(statement) if m.split(".")[0] in ("torch", "tvm")]
    assert heavy == []


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_works_for_every_subcommand(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Usage: optimize {command}") and "--debug" in out


def test_top_level_help_lists_every_visible_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS if name != "apply")


def test_pass_modules_touch_no_files_and_nothing_splices_proto_node_lists():
    passes = [*ROOT.glob("passes/*.py"), *ROOT.glob("passes/graph/*.py")]
    file_calls = re.compile(r"\bopen\(|np\.save|savefig|write_")
    assert [f"{p.name}:{n}" for p in passes for n, line in enumerate(p.read_text().splitlines(), 1)
            if file_calls.search(line)] == []
    splices = re.compile(r"del [\w.]*graph\.node\b|\.node\.remove\(|\.node\.insert\(")
    folders = ("optimizer", "passes", "runtimes", "samples", "benchmarks", "tests")
    code = [p for d in folders for p in ROOT.glob(f"{d}/**/*.py")
            if "passes/graph" not in str(p.relative_to(ROOT)) and p.name != "test_layering.py"]
    assert [f"{p.relative_to(ROOT)}:{n}" for p in code for n, line in enumerate(p.read_text().splitlines(), 1)
            if splices.search(line)] == []
