"""The import structure: one-way layers (the import-linter contract in pyproject.toml), no import cycle at
all (function-level imports included), and parsing a topology without torch."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import networkx as nx
import pytest

from support.paths import ROOT

grimp = pytest.importorskip("grimp", reason="the `test` extra (import-linter) is not installed")
importlinter_configuration = pytest.importorskip(
    "importlinter.configuration", reason="the `test` extra (import-linter) is not installed")
importlinter_configuration.configure()  # what the lint-imports command does first (readers, the graph builder)

# Pure checks of the source tree; the one child interpreter below only imports meshsl (torch must not load).
pytestmark = pytest.mark.unit


def _import_graph() -> nx.DiGraph:
    graph = grimp.build_graph("meshsl", cache_dir=None)  # function-level and TYPE_CHECKING imports included
    edges = nx.DiGraph()
    edges.add_nodes_from(graph.modules)
    for module in graph.modules:
        edges.add_edges_from((module, imported) for imported in graph.find_modules_directly_imported_by(module))
    return edges


def _layer_modules() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    return [m.strip() for layer in layers for m in layer.replace("|", ":").split(":")]


def test_layer_contract_holds():
    # use_cases.lint_imports, not importlinter.cli.lint_imports: the CLI entry runs logging.config.dictConfig,
    # which disables every logger that exists (meshsl's too) for the rest of the test session.
    from importlinter.application import use_cases
    assert use_cases.lint_imports(config_filename=str(ROOT / "pyproject.toml"), cache_dir=None, no_logo=True)


def test_no_import_cycle_among_meshsl_modules():
    cycles = [sorted(c) for c in nx.strongly_connected_components(_import_graph()) if len(c) > 1]
    assert cycles == []


def test_every_module_sits_in_a_layer():
    """A new module must be placed in the contract; only package __init__ files (re-exports) and
    `python -m meshsl` stay outside."""
    graph = _import_graph()
    layered = _layer_modules()
    packages = {m.rpartition(".")[0] for m in graph.nodes}
    outside = [m for m in graph.nodes if m not in packages and m != "meshsl.__main__"
               and not any(m == top or m.startswith(top + ".") for top in layered)]
    assert outside == []


def test_the_contract_rejects_an_upward_import(monkeypatch):
    """The contract is live: a low layer that reached up to the runtime would break it."""
    from importlinter.application import use_cases
    graph = grimp.build_graph("meshsl", cache_dir=None)
    graph.add_import(importer="meshsl.schedule.steps", imported="meshsl.node.runtime", line_number=1,
                     line_contents="from meshsl.node import runtime")
    monkeypatch.setattr(use_cases, "_build_graph", lambda *args, **kwargs: graph)
    report = use_cases.create_report(use_cases.read_user_options(str(ROOT / "pyproject.toml")), cache_dir=None)
    assert report.contains_failures and report.broken_count == 1


def test_parsing_a_topology_imports_no_torch():
    code = ("import json, sys\n"
            "from meshsl.topology.model import load_topology\n"
            "topology = load_topology('topologies/vanilla.yaml', infer_shapes=False)\n"
            "print(json.dumps({'nodes': sorted(topology.nodes), 'torch': 'torch' in sys.modules}))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == {"nodes": ["client", "server"], "torch": False}
