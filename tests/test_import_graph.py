"""karlo_model's modules import each other without a cycle (TYPE_CHECKING imports included), so any of them can
be imported first and a module's dependencies read top-down."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "karlo_model"


def imports_of(path: Path) -> set[str]:
    """The karlo_model modules that ``path`` imports, by module name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or (node.module or "").startswith("karlo_model"):
                parts = (node.module or "").split(".")
                inner = parts[0] if node.level == 1 else ".".join(parts[1:2])
                found |= {inner} if inner else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("karlo_model.")}
    return {m for m in found if (PACKAGE / f"{m}.py").is_file()} - {path.stem}


def test_karlo_model_has_no_import_cycle():
    graph = {p.stem: imports_of(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import cycle: " + " -> ".join(path[path.index(module):] + (module,))
        if module in done:
            return
        for dep in sorted(graph.get(module, ())):
            visit(dep, path + (module,))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())
