"""The layering the folder tree shows: core <- stages (autoencoder, ldm) <- pipelines <- recipes, web <- cli <- root
scripts. A package imports only its own modules and lower layers (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "autoencoder": 1, "ldm": 1, "pipelines": 2, "recipes": 3, "web": 3, "cli": 4}


def project_imports(path: Path) -> set[str]:
    """Top-level project packages that a file imports anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & LAYERS.keys()
    return found


def violations(root: Path) -> list[str]:
    bad = []
    for package, rank in LAYERS.items():
        for path in sorted((root / package).rglob("*.py")):
            for imported in project_imports(path) - {package}:
                if LAYERS[imported] >= rank:
                    bad.append(f"{path.relative_to(root)} imports {imported} (layer {LAYERS[imported]} >= {rank})")
    return bad


def test_no_package_imports_its_own_layer_or_a_higher_one():
    assert violations(ROOT) == []


def test_the_check_catches_an_upward_import(tmp_path):
    for package in LAYERS:
        (tmp_path / package).mkdir()
    (tmp_path / "core" / "bad.py").write_text("def f():\n    from pipelines import Pipeline\n")
    (tmp_path / "ldm" / "sideways.py").write_text("import autoencoder.model\n")
    assert violations(tmp_path) == ["core/bad.py imports pipelines (layer 2 >= 0)",
                                    "ldm/sideways.py imports autoencoder (layer 1 >= 1)"]
