"""The stages, one module each. A module that defines a :class:`icf.pipeline.Stage` subclass is a stage:
it is found here, gets its ``icf stage <name>`` command and joins ``icf stage all`` in dependency order.
``index.py`` is the root (it writes the manifest every stage reads) and is not a unit stage.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from icf.pipeline.stage import Stage


@cache
def stage_classes() -> dict[str, type[Stage]]:
    """Every unit stage by name, in an order where each comes after the stages it ``needs`` or ``wants``."""
    found: dict[str, type[Stage]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Stage) and obj.__module__ == module.__name__:
                found[obj.name] = obj
    ordered: dict[str, type[Stage]] = {}

    def visit(name: str, chain: tuple[str, ...] = ()) -> None:
        if name in chain:
            raise RuntimeError(f"stage dependency cycle: {' -> '.join(chain + (name,))}")
        if name in ordered:
            return
        for need in found[name].needs + found[name].wants:
            visit(need, chain + (name,))
        ordered[name] = found[name]

    for name in sorted(found, key=lambda n: (found[n].uses_model, n)):  # CPU stages first: cheap failures show early
        visit(name)
    return ordered
