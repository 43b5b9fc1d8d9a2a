"""Architecture rules that keep the library usable from a notebook: only cli/ draws, no private imports."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "homoexport"


def library_modules() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "cli" not in p.relative_to(PACKAGE).parts]


def test_no_library_module_imports_rich_or_prints():
    offenders = []
    for path in library_modules():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                if any(n == "rich" or n.startswith("rich.") for n in names):
                    offenders.append(f"{path.name}:{node.lineno} imports rich")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.name}:{node.lineno} calls print")
    assert not offenders, offenders


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("homoexport"):
                offenders += [f"{path.name}:{node.lineno} {a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    assert not offenders, offenders


def test_library_does_not_touch_matplotlib_global_state():
    for path in library_modules():
        text = path.read_text()
        assert "matplotlib.use(" not in text and "import matplotlib.pyplot" not in text, path.name
