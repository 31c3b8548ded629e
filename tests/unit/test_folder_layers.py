"""Folders are the layers (issue 30): the contract in pyproject.toml names packages only, and no module
imports from a folder above its own -- read straight from the source with `ast`, function-level and
TYPE_CHECKING imports included, without import-linter, so the rule holds even if that tool changes."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "meshsl"
pytestmark = pytest.mark.unit


def _layers() -> list[list[str]]:
    """Top to bottom; each layer a list of `meshsl.<folder>` names ("|": siblings that must not meet)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    return [[name.strip() for name in layer.replace("|", ":").split(":")] for layer in layers]


def _folder_of(module: str) -> str | None:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "meshsl" and len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of meshsl in one file, wherever it sits."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}" if base else alias.name) for alias in node.names]
    return [(line, name) for line, name in found if name.startswith("meshsl.")]


def _rank() -> dict[str, int]:
    return {folder: index for index, layer in enumerate(_layers()) for folder in layer}


def upward_imports(files: list[Path]) -> list[str]:
    rank, siblings = _rank(), {f: set(layer) - {f} for layer in _layers() for f in layer}
    problems = []
    for path in files:
        importer = _folder_of(".".join(path.relative_to(ROOT).with_suffix("").parts))
        if importer not in rank:
            continue
        for line, imported in _imports(path):
            target = _folder_of(imported)
            if target in rank and target != importer and (rank[target] < rank[importer] or target in siblings[importer]):
                problems.append(f"{path.relative_to(ROOT)}:{line} imports {imported} ({target} is not below {importer})")
    return problems


def test_the_contract_names_folders_only():
    for layer in _layers():
        for folder in layer:
            assert (ROOT / folder.replace(".", "/") / "__init__.py").is_file(), f"{folder} is not a package"


def test_every_folder_of_meshsl_is_a_layer():
    folders = {f"meshsl.{p.parent.name}" for p in PACKAGE.glob("*/__init__.py")}
    assert folders == set(_rank()), "a folder outside the contract, or a contract entry without a folder"
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert loose == [], "modules belong in a folder (a layer)"


def test_no_module_imports_from_a_folder_above_its_own():
    assert upward_imports(sorted(PACKAGE.rglob("*.py"))) == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """Planted: the schedule (a low folder) reaching the node shell inside a function; and a sibling import."""
    planted = ROOT / "meshsl" / "schedule" / "planted_probe.py"
    source = "def f():\n    from meshsl.node.runtime import NodeRuntime\n\nfrom meshsl.coordinator import runtime\n"
    sibling = ROOT / "meshsl" / "node" / "planted_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self, **kw: source if self in (planted, sibling)
                        else Path.read_bytes(self).decode(kw.get("encoding") or "utf-8"))
    found = upward_imports([planted, sibling])
    assert len(found) == 3 and all("not below" in f for f in found), found
    assert any("meshsl/node/planted_probe.py:4" in f for f in found)  # node and coordinator are siblings
