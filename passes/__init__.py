"""Graph passes, one module each, registered by name.

Every module in this package (except `base`) that defines a `Pass` subclass decorated with `@register`
is discovered on first use, so adding a pass is adding a module.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from optimizer.errors import UsageError
from passes.base import Artifact, Pass, PassContext, PassResult, option

__all__ = ["Artifact", "Pass", "PassContext", "PassResult", "option", "register", "get_pass", "all_passes"]

_REGISTRY: dict[str, type[Pass]] = {}
_discovered = False


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add a pass to the registry after checking its declaration (name, summary, contract and
    a frozen Options dataclass, so options cannot change after validation)."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"two passes are registered as {cls.name!r}")
    for attribute in ("name", "summary", "Options"):
        if not hasattr(cls, attribute):
            raise RuntimeError(f"pass class {cls.__name__} has no {attribute}")
    if not dataclasses.is_dataclass(cls.Options) or not cls.Options.__dataclass_params__.frozen:
        raise RuntimeError(f"pass {cls.name}: Options must be a frozen dataclass (@dataclass(frozen=True))")
    if cls.contract not in ("exact", "approximate"):
        raise RuntimeError(f"pass {cls.name}: contract {cls.contract!r} is not exact or approximate")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.ispkg:
            importlib.import_module(f"{__name__}.{info.name}")
    _discovered = True


def all_passes() -> dict[str, type[Pass]]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    passes = all_passes()
    if name not in passes:
        raise UsageError(f"unknown pass {name!r}; available passes: {', '.join(passes)}")
    return passes[name]
