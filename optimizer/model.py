"""Loading, checking and saving ONNX models: clear errors, opset upgrades, atomic writes, external data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from onnx import shape_inference, version_converter

from optimizer.errors import ModelError, SculptError, UsageError, WriteError, first_line

MIN_OPSET = 13
# protobuf refuses to serialize a single message over 2 GiB; larger models keep their tensors as external data.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = 1024
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                         onnx.TensorProto.BFLOAT16})  # element types that hold weights (params) and activations


def load_model(path: str | os.PathLike, *, notes: list[str] | None = None) -> onnx.ModelProto:
    """Read an ONNX file (with its external data), check it, upgrade opsets older than 13 and normalise it
    (optimizer.normalize: IR < 4 weights, Constant-node weights, constant subgraphs). `notes`, when given,
    receives one line per normalisation step a user may want to know about."""
    return read_model(path, notes=notes)[0]


def read_model(path: str | os.PathLike, *, notes: list[str] | None = None) -> tuple[onnx.ModelProto, bool]:
    """load_model, plus whether the file kept its tensors as external data (so the output can do the same)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, not an ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
        external = has_external_data(model)
        if external:
            onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as e:  # protobuf raises DecodeError, onnx raises ValueError/FileNotFoundError for external data
        raise ModelError(f"{path}: not a readable ONNX model ({first_line(e)})") from e
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{path}: not a readable ONNX model (empty or truncated file: no graph)")
    if not model.graph.output:
        raise ModelError(f"{path}: the graph has no outputs; nothing could be computed or compared")
    check_model(model, str(path))
    from optimizer.normalize import normalize

    model, steps = normalize(upgrade_opset(model, str(path)))
    if notes is not None:
        notes.extend(f"{path.name}: {step}" for step in steps)
    return model, external


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 0


def upgrade_opset(model: onnx.ModelProto, where: str = "model") -> onnx.ModelProto:
    opset = default_opset(model)
    if opset >= MIN_OPSET:
        return model
    try:
        converted = version_converter.convert_version(model, MIN_OPSET)
        onnx.checker.check_model(converted)
    except Exception as e:
        raise ModelError(
            f"{where}: opset {opset} is older than {MIN_OPSET} and could not be converted "
            f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); re-export with opset >= 13"
        ) from e
    return converted


def check_model(model: onnx.ModelProto, where: str = "model", full: bool = False,
                error: type[SculptError] = ModelError) -> None:
    """onnx.checker; `full` adds strict shape inference. Raises `error` (ModelError: bad input, exit 2) with the
    checker's first line; the pipeline passes PassError when it checks a pass's output."""
    try:
        if model.ByteSize() > PROTOBUF_LIMIT:
            with tempfile.TemporaryDirectory() as tmp:
                tmp_path = os.path.join(tmp, "model.onnx")
                save_model(model, tmp_path)
                onnx.checker.check_model(tmp_path, full_check=full)
        else:
            onnx.checker.check_model(model, full_check=full)
    except shape_inference.InferenceError as e:
        raise error(f"{where}: fails shape inference: {first_line(e)}") from e
    except onnx.checker.ValidationError as e:
        raise error(f"{where}: fails the ONNX checker: {first_line(e)}") from e
    except (UnicodeDecodeError, ValueError, TypeError, RuntimeError) as e:  # corrupt strings, bad enum values
        raise error(f"{where}: fails the ONNX checker ({type(e).__name__}: {first_line(e)})") from e
    _check_text(model.graph, where, error)
    known = set(onnx.TensorProto.DataType.values())
    for value in [*model.graph.input, *model.graph.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type not in known:
            raise error(f"{where}: graph input/output {value.name!r} has unknown element type code "
                        f"{value.type.tensor_type.elem_type}")
    for tensor in model.graph.initializer:
        if tensor.data_type not in known:
            raise error(f"{where}: initializer {tensor.name!r} has unknown element type code {tensor.data_type}")
    newest = onnx.defs.onnx_opset_version()
    if default_opset(model) > newest:
        raise error(f"{where}: opset {default_opset(model)} is newer than the newest this onnx supports ({newest}); "
                    f"re-export with opset <= {newest}")


def _check_text(graph: onnx.GraphProto, where: str, error: type[SculptError]) -> None:
    """Names must be text: protobuf hands back bytes for a string field that is not valid UTF-8 (a corrupt file),
    which the checker lets through and every later step trips over."""
    named = [*graph.input, *graph.output, *graph.value_info, *graph.initializer]
    for index, item in enumerate(named):
        if isinstance(item.name, bytes):
            raise error(f"{where}: tensor #{index} of graph {graph.name!r} has a name that is not valid UTF-8 "
                        "(corrupt file?)")
    for index, node in enumerate(graph.node):
        fields = [node.name, node.op_type, node.domain, node.doc_string, *node.input, *node.output]
        if any(isinstance(f, bytes) for f in fields):
            raise error(f"{where}: node #{index} has a name, op type or tensor name that is not valid UTF-8 "
                        "(corrupt file?)")
        for attribute in node.attribute:
            if isinstance(attribute.name, bytes):
                raise error(f"{where}: node #{index} has an attribute name that is not valid UTF-8 (corrupt file?)")
            for sub in ([attribute.g] if attribute.HasField("g") else list(attribute.graphs)):
                _check_text(sub, where, error)


def infer_shapes(model: onnx.ModelProto, strict: bool = True,
                 error: type[SculptError] = ModelError) -> onnx.ModelProto:
    try:
        return shape_inference.infer_shapes(model, check_type=True, strict_mode=strict, data_prop=True)
    except (shape_inference.InferenceError, onnx.checker.ValidationError, UnicodeDecodeError, ValueError,
            RuntimeError) as e:
        raise error(f"shape inference failed: {first_line(e)}") from e


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external: bool | None = None) -> Path:
    """Write atomically: into a temporary folder beside the target, then renamed into place when complete.

    `external=True` writes the tensors to `<name>.data` beside the model; None decides by size (protobuf cannot
    serialize a message over 2 GiB). An old `<name>.data` is replaced, and put back if the model's own rename
    fails, so the model and its data never disagree. The output directory must exist; on any failure nothing is
    left behind. Callers check the path with `optimizer.paths.OutputPlan` first (never an input's file).
    """
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise UsageError(f"{path}: output directory {directory} does not exist")
    if external is None:
        external = model.ByteSize() > PROTOBUF_LIMIT
    data_name = f"{path.name}.data"
    try:
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=directory) as tmp:
            staged = Path(tmp) / path.name
            if external:
                detached = onnx.ModelProto()
                detached.CopyFrom(model)  # onnx rewrites the tensors it moves out as references, in place
                onnx.save_model(
                    detached, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=EXTERNAL_DATA_THRESHOLD,
                )
                _publish_pair(staged, Path(tmp) / data_name, path, directory / data_name, Path(tmp))
            else:
                onnx.save_model(model, str(staged))
                _ordinary_permissions(staged)
                os.replace(staged, path)
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({e.strerror or e})") from e
    return path


def _publish_pair(staged: Path, staged_data: Path, path: Path, data: Path, tmp: Path) -> None:
    """Rename the data file, then the model, into place; if the model's rename fails, restore the old data."""
    _ordinary_permissions(staged)
    if not staged_data.exists():  # every tensor was under the size threshold: nothing went to external data
        os.replace(staged, path)
        return
    _ordinary_permissions(staged_data)
    backup = tmp / "previous.data"
    had_old = data.exists()
    if had_old:
        os.replace(data, backup)
    try:
        os.replace(staged_data, data)
        os.replace(staged, path)
    except OSError:
        if had_old:
            os.replace(backup, data)
        elif data.exists():
            data.unlink()
        raise


def _ordinary_permissions(path: Path) -> None:
    """Temporary folders are private (0700, files 0600); a written model is an ordinary file (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def copy_model_fields(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    """Copy the model-level facts (versions, producer, docs, `sculpt.` metadata, opsets) onto a rebuilt model.

    onnx-graphsurgeon rebuilds the ModelProto from the graph alone; passes that use it call this afterwards.
    """
    target.ir_version = source.ir_version
    target.producer_name = source.producer_name
    target.producer_version = source.producer_version
    target.domain = source.domain
    target.model_version = source.model_version
    target.doc_string = source.doc_string
    del target.metadata_props[:]
    target.metadata_props.extend(source.metadata_props)
    del target.opset_import[:]
    target.opset_import.extend(source.opset_import)


def metadata_value(model: onnx.ModelProto, key: str) -> str | None:
    """The model's metadata_props value for `key`, or None."""
    return next((p.value for p in model.metadata_props if p.key == key), None)


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    """Set metadata_props[key] to `value`, replacing an earlier value for the key (keys stay unique)."""
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)
