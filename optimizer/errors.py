"""User-facing error types. The CLI prints `str(error)` and exits with `error.exit_code`."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class SculptError(Exception):
    """A failure the user can act on (exit code 1): a pass failed, verification failed, a runtime failed."""

    exit_code = 1


class UsageError(SculptError):
    """The command was asked for something malformed (exit code 2): bad option, unknown pass, missing file."""

    exit_code = 2


class ModelError(SculptError):
    """The model file cannot be used: not ONNX, truncated, fails the checker, unsupported opset."""


class PassError(SculptError):
    """A pass could not complete on this model."""


class VerificationError(SculptError):
    """A pass changed the model's outputs beyond what its contract allows."""


class RuntimeFailure(SculptError):
    """A runtime could not load or run the model."""


class MissingDependency(UsageError):
    """An optional component (torch, tvm) is needed but not installed."""

    def __init__(self, package: str, extra: str):
        super().__init__(
            f"this needs {package}, which is not installed; install it with: pip install 'sculpt[{extra}]'"
        )
