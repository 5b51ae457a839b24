"""The pass registry: pass name -> Pass class.

Built-in passes register with :func:`register_pass` when their module is imported; the
modules are listed in :data:`BUILTIN_MODULES` and imported on first lookup, so importing
splice stays cheap. Third-party packages add passes through the entry-point group
``splice.passes`` (``name = "package.module:PassClass"``), loaded on the first lookup too.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from splice.errors import PipelineError
from splice.passes.base import Pass

BUILTIN_MODULES = (
    "splice.passes.branches",
    "splice.passes.cleanup",
    "splice.passes.experts",
    "splice.passes.heal",
    "splice.passes.lowrank",
    "splice.passes.hyper",
    "splice.passes.specialize",
    "splice.passes.stitch",
)
ENTRY_POINT_GROUP = "splice.passes"

_REGISTRY: dict[str, type[Pass]] = {}
_loaded = False
_entry_point_errors: dict[str, str] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make ``cls`` available by ``cls.name`` in pipelines."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no `name`")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise TypeError(
            f"pass name {cls.name!r} is taken by {existing.__module__}.{existing.__qualname__}"
        )
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as e:  # a broken plug-in must not break splice
            _entry_point_errors[ep.name] = f"{type(e).__name__}: {e}"
            continue
        if isinstance(cls, type) and issubclass(cls, Pass):
            if not cls.name:
                cls.name = ep.name
            register_pass(cls)
        else:
            _entry_point_errors[ep.name] = f"{ep.value} is not a Pass subclass"


def available_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name (built-ins and plug-ins)."""
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_pass_class(name: str) -> type[Pass]:
    _load_all()
    cls = _REGISTRY.get(name)
    if cls is None:
        msg = f"unknown pass {name!r}"
        if name in _entry_point_errors:
            msg += f" (its plug-in failed to load: {_entry_point_errors[name]})"
        raise PipelineError(msg, hint=f"available passes: {', '.join(sorted(_REGISTRY))}")
    return cls


__all__ = [
    "BUILTIN_MODULES",
    "ENTRY_POINT_GROUP",
    "available_passes",
    "get_pass_class",
    "register_pass",
]
