"""The package's shape, checked: no import cycle (imports inside functions counted), the
layers of .importlinter kept, and imports inside functions only where they must be."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tiered_cache"

# Where an import may sit inside a function, and why.
ALLOWED_INNER_IMPORTS = {
    # AppConfig.ready(): these reach the outbox model, which loads after the app registry.
    ("apps.py", "."),
    # Optional dependencies: Celery (the [celery] extra) and psycopg (PostgreSQL only).
    ("maintenance.py", "celery"),
    ("transactions.py", "django.db.backends.postgresql.psycopg_any"),
    # tiered_cache.__version__ on first use: importing importlib.metadata costs ~25 ms.
    ("__init__.py", "importlib.metadata"),
}


def _cycles(graph: grimp.ImportGraph) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    modules = sorted(graph.modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on.add(m)
        for n in graph.find_modules_directly_imported_by(m):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            comp = set()
            while True:
                n = stack.pop()
                on.discard(n)
                comp.add(n)
                if n == m:
                    break
            if len(comp) > 1:
                out.append(comp)

    for m in modules:
        if m not in index:
            visit(m)
    return out


def test_no_module_is_in_an_import_cycle() -> None:
    graph = grimp.build_graph("tiered_cache")  # counts imports inside functions too
    # The package's own __init__ imports its submodules lazily by name, never by statement.
    assert _cycles(graph) == []


def test_the_layers_contract_holds() -> None:
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_imports_inside_functions_only_where_they_must_be() -> None:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom):
                        name = "." * node.level + (node.module or "")
                        found.add((str(path.relative_to(PACKAGE)), name))
                    elif isinstance(node, ast.Import):
                        found.add((str(path.relative_to(PACKAGE)), node.names[0].name))
    assert found <= ALLOWED_INNER_IMPORTS, sorted(found - ALLOWED_INNER_IMPORTS)
