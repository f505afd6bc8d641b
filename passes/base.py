"""The pass contract: a registered class with typed options, a contract and `run(model, ctx)`."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import onnx

from optimizer.errors import UsageError
from optimizer.options import option_types, parse_options

Contract = Literal["exact", "approximate"]


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A pass option: its default and the help text shown by `optimize passes`."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class PassContext:
    """What a pass may use besides the model.

    calibration: input name -> array (never None inside a pipeline: random inputs when the user gave none).
    calibration_is_random: True when the calibration inputs are seeded random data, not the user's.
    evaluation: input name -> array plus "labels", when the user passed --eval.
    """

    calibration: dict[str, np.ndarray] | None = None
    calibration_is_random: bool | None = None
    evaluation: dict[str, np.ndarray] | None = None
    seed: int = 0
    progress: Callable[[str, float], None] | None = None
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.calibration_is_random is None:
            self.calibration_is_random = self.calibration is None

    def warn(self, message: str) -> None:
        """Record a warning; the pipeline prints it and puts it in the report."""
        self.warnings.append(message)

    def report_progress(self, what: str, fraction: float) -> None:
        if self.progress is not None:
            self.progress(what, fraction)


@dataclass(frozen=True)
class Artifact:
    """A file a pass produces besides the model (a key, a plan, a plot), held as data until the run is verified.

    path: where the user asked for it. what: a few words for messages ("mole key"). content: the file's bytes.
    The pipeline writes every artifact atomically, and only after every pass has passed verification:

        Artifact("plan.json", "structured-sparse plan", b'{"format": ...}')
    """

    path: str
    what: str
    content: bytes


@dataclass(frozen=True)
class PassResult:
    """What `Pass.run` returns: the new model, the pass's report and the files it wants written.

    It unpacks as `(model, report)` for callers that need only those two:

        model, report = pass_.run(model, ctx)
        artifacts = pass_.run(model, ctx).artifacts
    """

    model: onnx.ModelProto
    report: dict
    artifacts: tuple[Artifact, ...] = ()

    def __iter__(self):
        return iter((self.model, self.report))


class Pass:
    """Base class. Subclasses set `name`, `summary`, `Options` (a dataclass) and `contract`, and implement `run`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type]
    contract: ClassVar[Contract] = "approximate"
    speedup: ClassVar[bool] = False  # does the pass promise a faster model (held to it by the speed gate)?

    def __init__(self, options: Any | None = None):
        self.options = options if options is not None else self.Options()
        self.validate()

    def validate(self) -> None:
        """Check option values; raise UsageError naming the option. Override to add checks."""

    def contract_for_options(self) -> Contract:
        """The contract under the current options (e.g. structured-sparse is exact only for criterion=zero)."""
        return self.contract

    def claims_speedup(self, result: PassResult) -> bool:
        """Whether this run promises a faster model; `--gate` measures such a pass and fails it when it is not."""
        return self.speedup

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """A new model (the input is never mutated), the report and any artifacts; never touches files."""
        raise NotImplementedError

    def map_inputs(self, result: PassResult, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The inputs of `result.model` that correspond to `feeds` of the model the pass ran on. Most passes keep
        the inputs; one that re-encodes an input (mole) overrides this, reading what it needs from the result's
        `sculpt.*` metadata and artifacts (never from state kept on the pass), and the pipeline verifies through
        it."""
        return feeds

    @classmethod
    def from_spec(cls, values: dict[str, str | Any]) -> Pass:
        """Build from `key=value` strings (CLI) or typed values (recipe, Python API)."""
        return cls(parse_options(cls.Options, values, where=f"pass {cls.name}"))


def option_fields(pass_cls: type[Pass]) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) for every option of a pass."""
    types = option_types(pass_cls.Options)
    return [(f, types[f.name]) for f in dataclasses.fields(pass_cls.Options)]


def file_options(pass_: Pass) -> list[tuple[str, str, str]]:
    """(option name, "read" | "write", path) for every set option declared with `option(..., file=...)`, so the
    CLI can apply its output-path safety rule to the files a pass reads and writes."""
    found = []
    for f in dataclasses.fields(pass_.options):
        kind = f.metadata.get("file")
        value = getattr(pass_.options, f.name)
        if kind and value:
            found.append((f.name, kind, str(value)))
    return found


def compile_regex(pass_name: str, key: str, pattern: str | None) -> re.Pattern | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UsageError(
            f"pass {pass_name}: option {key}={pattern!r} is not a valid regular expression ({e})"
        ) from None
