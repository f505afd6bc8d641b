"""Output-path safety: the one rule every command applies before it does any work.

A command lists what it reads (models with their external data, .npz data, recipes, keys) and what it will
write (model, the model's external data, report, plan, key, plot, run output). `check_outputs` refuses, with a
usage error naming both paths, any output that resolves to an input file or to another output of the same run,
an output that is an existing folder, and an output whose folder is missing or not writable. Nothing is read or
written before the check, so a refused command leaves every file as it was.

    >>> plan = OutputPlan()
    >>> plan.read_model("m.onnx")                    # m.onnx and every external data file it names
    >>> plan.write("--report", "m.onnx")
    >>> plan.check()                                 # UsageError: m.onnx: --report would overwrite the input model
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from optimizer.errors import UsageError


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external data files an ONNX file names (read without loading tensors); [] when it names none or the
    file cannot be parsed (loading it later reports that)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        return []
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable model is reported by the loader, not here
        return []
    locations = set()
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(path.parent / location for location in locations)


def _all_tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for sub in attribute.graphs:
                yield from _all_tensors(sub)


def output_model_path(output: str | os.PathLike, model: str | os.PathLike) -> Path:
    """`-o FILE` as given; `-o DIR/` (or an existing folder) means DIR/<input model's file name>.

    >>> output_model_path("out/", "models/m.onnx")
    PosixPath('out/m.onnx')
    """
    text = str(output)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        folder = Path(text)
        if not folder.is_dir():
            raise UsageError(f"{text}: -o names a folder that does not exist; create it or give a file name")
        return folder / Path(model).name
    return Path(text)


@dataclass
class OutputPlan:
    """What one command reads and writes, checked as a whole by `check()`."""

    reads: list[tuple[str, Path]] = field(default_factory=list)
    writes: list[tuple[str, Path]] = field(default_factory=list)

    def read(self, label: str, path: str | os.PathLike | None) -> None:
        """An input file (a path that does not exist is left to the loader to report)."""
        if path is not None:
            self.reads.append((label, Path(path)))

    def read_model(self, path: str | os.PathLike | None, label: str = "the input model") -> None:
        """An ONNX input and every external data file it names."""
        if path is None:
            return
        self.read(label, path)
        for data in external_data_files(path):
            self.read(f"the external data of {label} {path}", data)

    def write(self, label: str, path: str | os.PathLike | None) -> None:
        if path is not None:
            self.writes.append((label, Path(path)))

    def write_model(self, path: str | os.PathLike, label: str = "-o", external: bool = False) -> None:
        """An ONNX output; with `external`, also its `<name>.data` beside it."""
        self.write(label, path)
        if external:
            self.write(f"the external data of {label}", Path(f"{path}.data"))

    def check(self) -> None:
        """Raise UsageError for the first unsafe output; see the module docstring for the rule."""
        for index, (label, path) in enumerate(self.writes):
            for read_label, read_path in self.reads:
                if _same_file(path, read_path):
                    raise UsageError(f"{path}: {label} would overwrite {read_label} {read_path}; choose another path")
            for other_label, other in self.writes[:index]:
                if _same_file(path, other):
                    raise UsageError(f"{path}: {label} and {other_label} would write the same file; "
                                     "give each output its own path")
            _check_writable(label, path)


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _check_writable(label: str, path: Path) -> None:
    if path.is_dir():
        raise UsageError(f"{path}: {label} is an existing folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"{path}: {label} folder {folder} does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".sculpt-probe."):
            pass
    except OSError as e:
        raise UsageError(f"{path}: {label} folder {folder} is not writable ({e.strerror or e})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{path}: {label} exists and is read-only; remove it or choose another path")
