"""`meshsl align`: the overlap of the parties' sample ids, by private set intersection, without training."""
from __future__ import annotations

from typing import Any

import json
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from meshsl.cli.common import fail, load
from meshsl.errors import ConfigError, MeshslError

out = Console(soft_wrap=True, width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)


def align(topology: Path = typer.Argument(..., help="topology YAML whose data sources name id columns or id files"),
          as_json: bool = typer.Option(False, "--json", help="machine-readable")) -> None:
    """Report the overlap of every pair of parties' sample ids and the common samples training would use.

    Runs the same PSI as the nodes do, here in one process (every party's files must be readable here);
    nothing is trained."""
    from meshsl.align.ids import uses_ids  # start-up: `meshsl --help` parses nothing
    from meshsl.apps.align_report import overlap_report  # start-up: `meshsl --help` parses nothing
    topo = load(topology)
    if not uses_ids(topo):
        fail(ConfigError("no data source names sample ids (id_column or id_file); rows are matched by position",
                         str(topology)))
    try:
        report = overlap_report(topo)
    except MeshslError as exc:
        fail(exc)
    if as_json:
        out.print_json(json.dumps(report))
        return
    table = Table(title=f"{report['topology']}: sample-id overlap per pair of parties (PSI)")
    for column in ("party (node)", "ids", "party (node)", "ids", "common", "share of each"):
        table.add_column(column)
    for p in report["pairs"]:
        (a, b), (pa, pb), (na, nb) = p["nodes"], p["parties"], p["ids"]
        table.add_row(f"{pa} ({a})", f"{na:,}", f"{pb} ({b})", f"{nb:,}", f"{p['common']:,}",
                      f"{p['share'][0]:.0%} / {p['share'][1]:.0%}")
    out.print(table)
    out.print(f"common to every party: {report['common']:,} samples -> {report['train']:,} train / "
              f"{report['test']:,} test (test_fraction {report['test_fraction']}); leader {report['leader']}")


def mount(app: typer.Typer) -> None:
    app.command(name="align")(align)


def print_alignment_step(console: Any, step: dict) -> None:
    """The plan's alignment step (`meshsl plan`)."""
    table = Table(title=f"alignment step ({step['when']}): {step['protocol']}")
    for column in ("node", "role", "ids", "learns"):
        table.add_column(column)
    sources: dict[str, Any] = {}
    for name, s in step["ids"].items():
        sources.setdefault(s["node"], []).append(f"{name}: {s['from']}")
    for node, learns in step["learns"].items():
        role = "leader" if node == step["leader"] else "member" if node in step["members"] else "observer"
        table.add_row(node, role, "; ".join(sources.get(node, ["-"])), learns)
    console.print(table)
    console.print(f"crosses: {step['crosses']}; order: {step['order']}; min_intersection {step['min_intersection']}")
