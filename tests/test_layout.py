"""The package's shape: folders by job, imports only downward, no loops, small modules and functions.

Every `import` of a ptcli module counts, at module level or inside a function (a lazy import is
still a dependency). The floors, top to bottom, are those of the README's map of the folders.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "ptcli"
# Top to bottom. A module may import its own folder and any lower floor; the folders on one floor not each other.
FLOORS: list[set[str]] = [
    {"__main__"},
    {"cli"},
    {"serving", "evaluation"},
    {"api"},
    {"inference", "tuning"},
    {"project"},
    {"lm"},
    {"data"},
    {"", "config", "errors", "enums", "dist", "preempt"},  # the root ("" is ptcli/__init__.py)
]
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 300, 60


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a folder's __init__ is the folder's name)."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = ("ptcli", *path.relative_to(PKG).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The ptcli modules a file imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "ptcli"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ptcli":
            for a in node.names:  # `from ptcli.project import bank` names a module; `from ptcli.config import X` not
                found.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module)
    return {m for m in found if m in MODULES}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _folder(module: str) -> str:
    """The folder (or root module) a module belongs to: ptcli.lm.forward -> lm, ptcli.config -> config."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _floor(module: str) -> int:
    folder = _folder(module)
    return next(i for i, names in enumerate(FLOORS) if folder in names)


def test_every_module_has_a_floor() -> None:
    placed = set().union(*FLOORS)
    assert {_folder(m) for m in MODULES} <= placed, sorted({_folder(m) for m in MODULES} - placed)


def test_imports_point_down() -> None:
    root = FLOORS[-1]
    wrong = []
    for importer, imported in GRAPH.items():
        for target in imported:
            same = _folder(importer) == _folder(target) or {_folder(importer), _folder(target)} <= root
            if not same and _floor(target) <= _floor(importer):
                wrong.append(f"{importer} -> {target}")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_import_loop() -> None:
    """Depth-first search; a grey node reached again closes a loop."""
    colour: dict[str, int] = {}  # 1 on the path, 2 done
    loops: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        colour[node] = 1
        for nxt in sorted(GRAPH[node]):
            if colour.get(nxt) == 1:
                loops.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in colour:
                visit(nxt, path + [nxt])
        colour[node] = 2

    for m in sorted(GRAPH):
        if m not in colour:
            visit(m, [m])
    assert not loops, "import loops:\n" + "\n".join(" -> ".join(loop) for loop in loops)


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in PKG.glob("*/__init__.py")))
def test_every_folder_says_what_it_holds(folder: str) -> None:
    doc = ast.get_docstring(ast.parse((PKG / folder / "__init__.py").read_text(encoding="utf-8")))
    assert doc and len(doc.split()) >= 30, f"ptcli/{folder}/__init__.py needs a paragraph on what lives there"
    assert "import" in doc, f"ptcli/{folder}/__init__.py should say what it may import"


def test_modules_and_functions_stay_small() -> None:
    big = []
    for name, path in MODULES.items():
        src = path.read_text(encoding="utf-8")
        if len(src.splitlines()) > MAX_MODULE_LINES:
            big.append(f"{name}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno is not None and node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    big.append(f"{name}.{node.name}: {node.end_lineno - start + 1} lines")
    assert not big, f"over {MAX_MODULE_LINES} lines a module or {MAX_FUNCTION_LINES} a function:\n" + "\n".join(big)
