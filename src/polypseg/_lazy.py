"""Public names of a package, imported on first use (PEP 562).

A package's ``__init__`` names its public API in a table (name -> defining module) and gets
``__getattr__``/``__dir__`` from :func:`lazy_exports`. Importing the package then loads nothing
heavy: ``import polypseg`` and ``polypseg --help`` stay free of torch, and importing one light
module of a stage package (``polypseg.data.inputs``) does not load its heavy siblings.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    namespace: dict[str, Any], table: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the package whose ``globals()`` is ``namespace``: they resolve the
    names of ``table`` on first use."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
