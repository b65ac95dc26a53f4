"""The layering the folder tree shows: core <- stages (autoencoder, ldm) <- pipelines <- evaluation, dataprep,
recipes, web <- cli <- the root scripts, benchmarks, docs scripts and tools. A package imports only its own modules
and lower layers (function-level and relative imports included), and no two modules of one package import each other
in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "autoencoder": 1, "ldm": 1, "pipelines": 2, "evaluation": 3, "dataprep": 3, "recipes": 3,
          "web": 3, "cli": 4, "tools": 5}
# consumers above every layer: they may import any package, and nothing imports them (tools only serves them)
TOP_FOLDERS = ("benchmarks", "docs")
ROOT_SCRIPTS = ("train_autoencoder.py", "train_ldm.py", "train_classifier.py")
TOP = 6
NAMES = (*LAYERS, *TOP_FOLDERS, "tests")


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(root: Path, path: Path) -> set[str]:
    """Dotted names of every project module a file imports anywhere in it, relative imports resolved."""
    package = module_name(root, path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[:len(package) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [f"{base}.{alias.name}" if base else alias.name for alias in node.names] + [base]
        else:
            continue
        found |= {name for name in names if name and name.split(".")[0] in NAMES}
    return found


def scanned_files(root: Path) -> dict[str, list[Path]]:
    """The files of every layered package, of the top folders and the root scripts, by the name they are ranked by."""
    files = {name: sorted((root / name).rglob("*.py")) for name in (*LAYERS, *TOP_FOLDERS)}
    files["root scripts"] = [root / name for name in ROOT_SCRIPTS if (root / name).is_file()]
    return files


def rank(name: str) -> int:
    return LAYERS.get(name, TOP)


def violations(root: Path) -> list[str]:
    bad = []
    for owner, paths in scanned_files(root).items():
        own_rank = rank(owner)
        for path in paths:
            for imported in sorted({m.split(".")[0] for m in imported_modules(root, path)} - {owner}):
                if imported == "tests" or rank(imported) >= own_rank:
                    bad.append(f"{path.relative_to(root)} imports {imported} (layer {rank(imported)} >= {own_rank})")
    return bad


def cycles(root: Path, package: str) -> list[list[str]]:
    """Import cycles among the modules of one package (each reported once, from its smallest module)."""
    modules = {module_name(root, p): p for p in sorted((root / package).rglob("*.py"))}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_modules(root, path):
            # `from pkg.mod import thing` names pkg.mod.thing: the longest known module prefix is the target
            parts = imported.split(".")
            for end in range(len(parts), 0, -1):
                if ".".join(parts[:end]) in modules:
                    targets.add(".".join(parts[:end]))
                    break
        graph[name] = targets - {name, package}  # a package's __init__ re-exporting its modules is not a cycle
    found = []

    def walk(start: str, node: str, trail: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                found.append(trail + [start])
            elif nxt not in trail and nxt > start:
                walk(start, nxt, trail + [nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return found


def test_no_package_imports_its_own_layer_or_a_higher_one():
    assert violations(ROOT) == []


def test_every_package_and_top_folder_is_scanned():
    files = scanned_files(ROOT)
    assert {name for name, paths in files.items() if not paths} == set()
    assert len(files["root scripts"]) == len(ROOT_SCRIPTS)
    # every top-level folder holding Python is ranked (tests aside), so a new package cannot escape the check
    folders = {d.name for d in ROOT.iterdir() if d.is_dir() and not d.name.startswith(".")
               and d.name not in ("tests", "build") and any(d.rglob("*.py"))}
    assert folders <= set(LAYERS) | set(TOP_FOLDERS), folders - set(LAYERS) - set(TOP_FOLDERS)


def test_no_import_cycle_inside_a_package():
    assert {package: cycles(ROOT, package) for package in LAYERS} == {package: [] for package in LAYERS}


def test_the_check_catches_upward_relative_and_cyclic_imports(tmp_path):
    for package in (*LAYERS, *TOP_FOLDERS):
        (tmp_path / package).mkdir()
    (tmp_path / "core" / "bad.py").write_text("def f():\n    from pipelines import Pipeline\n")
    (tmp_path / "ldm" / "sideways.py").write_text("import autoencoder.model\n")
    (tmp_path / "pipelines" / "__init__.py").write_text("")
    (tmp_path / "pipelines" / "up.py").write_text("from ..recipes import trainer\n")
    (tmp_path / "web" / "uses_benchmarks.py").write_text("from benchmarks.common import x\n")
    (tmp_path / "recipes" / "a.py").write_text("from recipes.b import thing\n")
    (tmp_path / "recipes" / "b.py").write_text("from . import a\n")
    (tmp_path / "train_ldm.py").write_text("import tests.helpers\n")
    assert violations(tmp_path) == ["core/bad.py imports pipelines (layer 2 >= 0)",
                                    "ldm/sideways.py imports autoencoder (layer 1 >= 1)",
                                    "pipelines/up.py imports recipes (layer 3 >= 2)",
                                    "web/uses_benchmarks.py imports benchmarks (layer 6 >= 3)",
                                    "train_ldm.py imports tests (layer 6 >= 6)"]
    assert cycles(tmp_path, "recipes") == [["recipes.a", "recipes.b", "recipes.a"]]
    assert cycles(tmp_path, "ldm") == []
