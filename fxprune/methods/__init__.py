"""Token-reduction methods, one module each, found by a registry.

Every module in this package is imported when the package is (they are discovered, not listed), and each
registers its method with :func:`register_method`. A user registers a method from their own code the same
way; ``fxprune.transform``, ``fxprune.parse_policy``, the plan and ``fxprune bench`` then know it.
See ``docs/DEVELOPING.md`` ("Adding a method").
"""

from __future__ import annotations

import importlib
import pkgutil

from .registry import (
    Knob,
    Learned,
    Method,
    SweepContext,
    get_method,
    method_of,
    methods,
    register_method,
    unregister_method,
)

__all__ = [
    "Method", "Knob", "Learned", "SweepContext", "register_method",
    "unregister_method", "method_of", "methods", "get_method",
]


def _discover() -> None:
    """Import every method module of this package, in the order of their names."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        if info.name != "registry":
            importlib.import_module(f"{__name__}.{info.name}")


_discover()
