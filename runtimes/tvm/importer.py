"""ONNX -> Relax with fixed input shapes, constants folded, and errors that name the ONNX node at fault."""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
import onnx

from optimizer.errors import RuntimeFailure, UsageError, first_line
from optimizer.model import default_opset
from runtimes.tvm.fold import fold_constants


@dataclass(frozen=True)
class InputSpec:
    """A graph input: its dims as declared (an int, or a name/None where the model leaves it open)."""

    name: str
    dims: tuple[int | str | None, ...]
    dtype: str

    def concrete(self, batch: int | None) -> tuple[int, ...] | None:
        """The shape with the batch (axis 0) filled in, or None when some other dim is still open."""
        shape = []
        for axis, dim in enumerate(self.dims):
            if isinstance(dim, int):
                shape.append(dim)
            elif axis == 0 and batch is not None:
                shape.append(batch)
            else:
                return None
        return tuple(shape)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
            for d in tensor_type.shape.dim
        )
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        specs.append(InputSpec(value.name, dims, dtype))
    return specs


def check_supported(model: onnx.ModelProto) -> None:
    """Fail before conversion, naming the first node whose op TVM's ONNX importer does not know."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"Constant", "If"}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in known:
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            raise RuntimeFailure(
                f"tvm runtime: TVM cannot import op {op!r} (node {node.name or node.output[0]!r}); "
                "run this model with --runtime ort, or rewrite that node into supported ONNX ops"
            )


def specialise(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """The model with its graph inputs fixed to `shapes` and every shape subgraph folded into constants
    (optimizer.normalize.fold_shapes): TVM's importer then sees static Reshape targets and ConstantOfShape sizes."""
    from optimizer.normalize import fold_shapes, has_foldable_nodes

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        if value.name not in shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, shapes[value.name], strict=False):
            dim.Clear()
            dim.dim_value = int(size)
    return fold_shapes(fixed) if has_foldable_nodes(fixed.graph) else fixed


def import_onnx(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]):
    """Relax module with the given input shapes; weights become constants and constant subgraphs are folded."""
    model = specialise(model, shapes)
    check_supported(model)
    dtypes = {spec.name: spec.dtype for spec in input_specs(model)}
    importer = _naming_importer({name: list(shape) for name, shape in shapes.items()}, dtypes)
    opset = default_opset(model)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Renaming name X to input_X": the importer's bookkeeping, not ours
            mod = importer.from_onnx(model.graph, opset)  # it prints to stdout before re-raising
    except Exception as e:  # the importer raises assorted Python and TVM errors
        where = importer.current or "the model"
        raise RuntimeFailure(f"tvm runtime: TVM could not import {where}: {first_line(e)}") from e
    return fold_constants(mod)


def _naming_importer(shapes: dict[str, list[int]], dtypes: dict[str, str]):
    """TVM's ONNX importer, remembering which node it is converting so that a failure can name it."""
    from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

    class NamingImporter(ONNXGraphImporter):
        current: str | None = None

        def _convert_operator(self, op_name, inputs, attrs, opset):
            node_name = attrs.get("tvm_custom", {}).get("name", "?")
            self.current = f"op {op_name!r} (node {node_name!r})"
            return super()._convert_operator(op_name, inputs, attrs, opset)

    return NamingImporter(shapes, dtypes, keep_params_in_input=False, sanitize=True)



def shapes_for(model: onnx.ModelProto, batch: int | None) -> dict[str, tuple[int, ...]] | None:
    """Input shapes with the batch filled in, or None when an input has another open dim (shapes come from feeds)."""
    shapes = {}
    for spec in input_specs(model):
        shape = spec.concrete(batch)
        if shape is None:
            return None
        if batch is not None and isinstance(spec.dims[0], int) and spec.dims[0] != batch:
            raise UsageError(
                f"runtime tvm: option batch={batch} but input {spec.name!r} has a fixed batch of {spec.dims[0]}"
            )
        shapes[spec.name] = shape
    return shapes
