"""One way to turn `key=value` strings (CLI), recipe/YAML values or Python values into a typed options dataclass.

Passes (`Pass.Options`) and runtimes (`TvmOptions`, `ReramOptions`) all parse through `parse_options`. Types come
from the dataclass's annotations: bool, int, float, str, Literal[...] and optional (`X | None`) forms of them. A
field whose values need more than that (a block shape, a list of ADC bits) names its parser in its metadata,
`field(default=..., metadata={"parse": fn})`; `fn(value)` returns the typed value, raising ValueError (reported as
"not a valid value") or a UsageError of its own.

    @dataclass(frozen=True)
    class Options:
        ratio: float = 0.5
        mode: Literal["fast", "exact"] = "fast"

    parse_options(Options, {"ratio": "0.25", "mode": "exact"}, where="pass demo")  # Options(0.25, "exact")
    parse_options(Options, {"ratoi": "1"}, where="pass demo")
    # UsageError: pass demo: unknown option 'ratoi'; options are: ratio, mode
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args, get_origin, get_type_hints

from optimizer.errors import UsageError

BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
NONE_WORDS = ("none", "")
NUMERIC_NONE_WORDS = ("none", "", "auto")


def option_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of an options dataclass."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def describe_type(tp: Any) -> str:
    """A short name for a type, as option listings show it: `int`, `l1|l2`, `float (optional)`."""
    if get_origin(tp) is Literal:
        return "|".join(str(a) for a in get_args(tp))
    args = [a for a in get_args(tp) if a is not type(None)]
    if args and len(args) == 1:
        return describe_type(args[0]) + " (optional)"
    return getattr(tp, "__name__", str(tp))


def coerce(where: str, key: str, tp: Any, value: Any) -> Any:
    """Convert one value to the declared type `tp`, or raise UsageError naming `where`, the key and the value."""
    origin = get_origin(tp)
    args = [a for a in get_args(tp) if a is not type(None)]
    optional = type(None) in get_args(tp)
    if value is None and optional:
        return None
    if origin is Literal:
        for choice in get_args(tp):
            if str(choice) == str(value):
                return choice
        raise UsageError(f"{where}: option {key}={value!r} is not one of {', '.join(map(str, get_args(tp)))}")
    if optional and len(args) == 1:
        words = NUMERIC_NONE_WORDS if args[0] in (int, float) else NONE_WORDS
        if isinstance(value, str) and value.strip().lower() in words:
            return None
        return coerce(where, key, args[0], value)
    try:
        if tp is bool:
            return value if isinstance(value, bool) else BOOL_WORDS[str(value).strip().lower()]
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value if not isinstance(value, str) else value.strip())
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            return str(value)
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{where}: option {key}={value!r} is not a valid {describe_type(tp)}") from None
    return value


def parse_options(cls: type, values: dict[str, Any], *, where: str) -> Any:
    """Build the options dataclass `cls` from `values` (keys may use '-' for '_'); unknown keys are a UsageError
    that lists the valid ones. Keys not given keep their defaults."""
    types = option_types(cls)
    parsers = {f.name: f.metadata.get("parse") for f in dataclasses.fields(cls)}
    normalized = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = [k for k in normalized if k not in types]
    if unknown:
        raise UsageError(f"{where}: unknown option {unknown[0]!r}; options are: {', '.join(types) or '(none)'}")
    typed = {}
    for key, value in normalized.items():
        parse = parsers[key]
        if parse is None:
            typed[key] = coerce(where, key, types[key], value)
            continue
        try:
            typed[key] = parse(value)
        except (ValueError, TypeError):
            raise UsageError(f"{where}: option {key}={value!r} is not a valid value") from None
    return cls(**typed)
