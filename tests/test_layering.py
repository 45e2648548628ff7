"""No import runs against the layering of ARCHITECTURE.md: a package imports only the packages before it
(function-level imports included, so no cycle hides behind a lazy import; imports under ``if TYPE_CHECKING:``
are annotations only, never executed, and are not counted)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "icf"
# ARCHITECTURE.md, package map: each floor may import itself and the floors before it
FLOORS = ["data.sample", "clitools", "data", "config", "encoders", "model", "methods", "pipeline", "stages",
          "workflow", "augment", "train", "eval", "towers", "demo", "cli"]


def floor(module: str) -> int:
    """The floor of ``icf.X.Y…`` (``data.sample`` has its own, below ``clitools``)."""
    parts = module.split(".")[1:]
    name = ".".join(parts[:2]) if parts[:2] == ["data", "sample"] else parts[0] if parts else ""
    return FLOORS.index(name)


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING" for n in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("icf."):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.module == "icf":
            found += [(node.lineno, f"icf.{a.name}") for a in node.names if a.name != "__version__"]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("icf.")]
    return found


def test_every_import_goes_down_the_floors() -> None:
    wrong = []
    files = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)
    assert len(files) > 60
    for path in files:
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        own = floor(".".join(rel.parts).removesuffix(".__init__"))
        for line, module in imports(path):
            if floor(module) > own:
                wrong.append(f"{rel}:{line} imports {module} (floor {FLOORS[floor(module)]} above {FLOORS[own]})")
    assert not wrong, "\n".join(wrong)
