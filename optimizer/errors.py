"""User-facing error types. The CLI prints `str(error)` and exits with `error.exit_code`.

Exit code 2: the command was asked for something it cannot use (usage errors and bad input: an unknown option,
a missing or unreadable model or data file, an unsafe output path). Exit code 1: the work itself failed (a pass,
verification, a runtime, writing the result). `tests/test_exit_codes.py` holds the table.
"""

import re

# "[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/.../x.h:46 void ns::Fn(args...) message" -> "FAIL: message"
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*(\w+)\s*:\s*")
_CPP_LOCATION = re.compile(r"/?\S+\.(?:h|cc|cpp):\d+\s+.*?\)\s+(?:const\s+)?(?=\S)")


def first_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message as one line a user can read (its type name when empty): the first line (joined with
    the next when it ends in a colon, where onnx's checker names the node), ONNX Runtime's status prefix and C++
    source location and signature removed, capped at `limit` characters.

        >>> first_line(Exception("[ONNXRuntimeError] : 1 : FAIL : /src/a.h:46 void f(int) Opset 99 is unknown"))
        'FAIL: Opset 99 is unknown'
    """
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    line = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    match = _ORT_PREFIX.match(line)
    if match:
        line = f"{match.group(1)}: " + _CPP_LOCATION.sub("", line[match.end():], count=1)
    return line if len(line) <= limit else line[:limit] + "…"


class SculptError(Exception):
    """A failure the user can act on (exit code 1): a pass failed, verification failed, a runtime failed."""

    exit_code = 1


class UsageError(SculptError):
    """The command was asked for something malformed (exit code 2): bad option, unknown pass, missing file."""

    exit_code = 2


class ModelError(UsageError):
    """The input model cannot be used (exit code 2): not ONNX, truncated, fails the checker, unsupported opset."""


class DataError(UsageError):
    """Input data cannot be used (exit code 2): not an .npz, empty, NaN/Inf, wrong rank, dtype or labels."""


class PassError(SculptError):
    """A pass could not complete on this model, or produced a model that fails the checker."""


class VerificationError(SculptError):
    """A pass changed the model's outputs beyond what its contract allows, or verification saw NaN/Inf."""


class QualityError(VerificationError):
    """`--strict`: an approximate pass fell below the cosine / top-1 agreement floor."""


class RuntimeFailure(SculptError):
    """A runtime could not load or run the model."""


class WriteError(SculptError):
    """An output could not be written after the work was done (disk full, I/O error); nothing partial is left."""


class MissingDependency(UsageError):
    """An optional component (torch, tvm) is needed but not installed."""

    def __init__(self, package: str, extra: str):
        super().__init__(
            f"this needs {package}, which is not installed; install it with: pip install 'sculpt[{extra}]'"
        )
