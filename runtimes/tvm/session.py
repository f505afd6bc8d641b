"""TvmSession: compiles per input-shape signature (memory + disk cache) and runs the Relax VM."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import onnx

from optimizer.data import feed_in_chunks, fixed_batch, graph_inputs
from optimizer.errors import RuntimeFailure, SculptError, UsageError, first_line
from runtimes.tvm import cache
from runtimes.tvm.compile import build
from runtimes.tvm.importer import input_specs, shapes_for
from runtimes.tvm.options import TvmOptions
from runtimes.tvm.target import default_threads, host_target, prepare_thread_pool, use_threads


@dataclass
class Compiled:
    """One compiled module: for one set of input shapes."""

    vm: object  # tvm.relax.VirtualMachine
    shapes: dict[str, tuple[tuple[int, ...], str]]  # input name -> (shape, dtype), in input order
    metadata: dict  # layers, untouched ops, compile seconds
    cache_hit: bool
    cache_note: str | None
    main: object = None  # vm["main"]
    inputs: list = field(default_factory=list)  # preallocated TVM tensors, in input order
    views: list = field(default_factory=list)  # writable numpy views of them: feeds are copied in with numpy

    def __post_init__(self):
        import tvm

        self.main = self.vm["main"]
        # tvm.runtime.tensor(array) costs ~10x a numpy copy into a preallocated tensor
        self.inputs = [tvm.runtime.empty(shape, dtype, tvm.cpu()) for shape, dtype in self.shapes.values()]
        self.views = [np.from_dlpack(tensor) for tensor in self.inputs]


class TvmSession:
    """A model on the tvm runtime. Input shapes are fixed per compiled module: with `batch` (or a model without
    open dims) it compiles at load, otherwise at the first run, and again for every new input shape."""

    def __init__(self, model: onnx.ModelProto, options: TvmOptions):
        prepare_thread_pool()
        self.model = model
        self.options = options
        self.host = host_target()
        self.threads = options.threads or default_threads()
        self.inputs = input_specs(model)
        self.output_names = [o.name for o in model.graph.output]
        self._digest = cache.model_hash(model)
        self._compiled: dict[tuple, Compiled] = {}
        self._last: Compiled | None = None
        self._lock = threading.Lock()
        self.batch = fixed_batch(graph_inputs(model))
        shapes = shapes_for(model, options.batch)
        if shapes is not None:
            dtypes = {spec.name: spec.dtype for spec in self.inputs}
            self._last = self._compile({name: (shape, dtypes[name]) for name, shape in shapes.items()})

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs for `feeds`; the first call with a new input shape compiles (or loads from the cache) first.
        More samples than a fixed batch are fed in chunks (optimizer.data.feed_in_chunks)."""
        return feed_in_chunks(self._run_once, feeds, self.batch)

    def _run_once(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm

        arrays = self._arrays(feeds)
        shapes = {spec.name: (array.shape, spec.dtype) for spec, array in zip(self.inputs, arrays, strict=True)}
        with self._lock:  # the preallocated input tensors are shared by calls
            compiled = self._compile(shapes)
            self._last = compiled
            use_threads(self.threads)
            for view, array in zip(compiled.views, arrays, strict=True):
                np.copyto(view, array)
            try:
                result = compiled.main(*compiled.inputs)
            except Exception as e:  # TVM raises its own error types for shape/dtype/runtime failures
                raise RuntimeFailure(f"tvm runtime failed to run the model: {first_line(e)}") from e
        outputs = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        return {name: np.array(np.from_dlpack(out)) for name, out in zip(self.output_names, outputs, strict=True)}

    def describe(self) -> dict:
        compiled = self._last
        facts = {
            "target": self.host.describe(),
            "threads": self.threads,
            "sparse": self.options.sparse,
            "block": str(self.options.block) if self.options.block else "auto",
        }
        if compiled is None:
            return {**facts, "compiled": False, "note": "compiles on the first run (input shapes come from the feeds)"}
        meta = compiled.metadata
        return {
            **facts,
            "compiled": True,
            "input_shapes": {name: list(shape) for name, (shape, _) in compiled.shapes.items()},
            "compile_seconds": round(meta["compile_seconds"], 3),
            "cache_hit": compiled.cache_hit,
            **({"cache_note": compiled.cache_note} if compiled.cache_note else {}),
            "tuning_records": meta.get("tuning_records"),
            "layers": meta["layers"],
            "untouched": meta["untouched"],
        }

    def _arrays(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        arrays = []
        for spec in self.inputs:
            if spec.name not in feeds:
                raise UsageError(f"runtime tvm: no value for model input {spec.name!r}")
            array = np.asarray(feeds[spec.name], dtype=spec.dtype, order="C")  # ascontiguousarray makes 0-d 1-d
            fixed = [(dim, size) for dim, size in zip(spec.dims, array.shape, strict=False) if isinstance(dim, int)]
            if array.ndim != len(spec.dims) or any(dim != size for dim, size in fixed):
                declared = ["?" if not isinstance(d, int) else d for d in spec.dims]
                raise UsageError(
                    f"runtime tvm: input {spec.name!r} has shape {list(array.shape)}; the model declares {declared}"
                )
            arrays.append(array)
        return arrays

    def _compile(self, shapes: dict[str, tuple[tuple[int, ...], str]]) -> Compiled:
        """The module for these (shape, dtype) inputs, compiled once per session (and cached on disk)."""
        signature = tuple(sorted(shapes.items()))
        if signature not in self._compiled:
            self._compiled[signature] = self._load_or_build(shapes)
        return self._compiled[signature]

    def _load_or_build(self, typed_shapes: dict[str, tuple[tuple[int, ...], str]]) -> Compiled:
        import tvm
        from tvm import relax

        shapes = {name: shape for name, (shape, _) in typed_shapes.items()}
        settings = self.options.code_settings()
        records = cache.tuning_dir(self.options.cache_dir, self._digest, self.host.key(), shapes, settings)
        tuning = cache.tuning_state(records) if self.options.tuned else None
        directory = cache.cache_dir(self.options.cache_dir)
        key = cache.entry_key(self._digest, self.host.key(), shapes, {**settings, "tuning": tuning})
        if self.options.cache and (hit := cache.load(directory, key)) is not None:
            module, metadata = hit
            return Compiled(relax.VirtualMachine(module, tvm.cpu()), typed_shapes, metadata, True, None)
        try:
            result = build(
                self.model, shapes, host=self.host, sparse=self.options.sparse, block=self.options.block,
                tuning_database=str(records) if tuning else None,
            )  # fmt: skip
        except SculptError:
            raise
        except Exception as e:  # a TVM error while lowering or compiling: a bug here or in TVM, not the user's
            raise RuntimeFailure(f"tvm runtime: compiling the model failed: {first_line(e)}") from e
        metadata = {
            "compile_seconds": result.seconds,
            "tuning_records": str(records) if tuning else None,
            "layers": result.layers,
            "untouched": result.untouched,
        }
        note = cache.store(directory, key, result.executable, metadata) if self.options.cache else None
        return Compiled(relax.VirtualMachine(result.executable, tvm.cpu()), typed_shapes, metadata, False, note)

