"""`meshsl validate` and `meshsl plan`: check a topology, explain what it will do."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from meshsl.cli.common import DEVICE_HELP, SET_HELP, load, out, overrides_of


def validate(topology: Path = typer.Argument(..., help="topology YAML"),
             assignments: list[str] = typer.Option([], "--set", help=SET_HELP),
             device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP)) -> None:
    """Check a topology; exit 0 when valid, print `error: ...` lines otherwise."""
    topo = load(topology, overrides=overrides_of(assignments, device))
    for warning in topo.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    out.print(f"{topology}: valid ({', '.join(topo.recognised_configurations())}; "
              f"{len(topo.nodes)} nodes, {len(topo.segments)} segments, {len(topo.tasks)} tasks)")


def plan(topology: Path = typer.Argument(...), as_json: bool = typer.Option(False, "--json", help="machine-readable"),
         cuts: bool = typer.Option(False, "--cuts", help="evaluate candidate cut points"),
         schedule: bool = typer.Option(False, "--schedule", help="print each node's compute order of a training step"),
         assignments: list[str] = typer.Option([], "--set", help=SET_HELP),
         device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP)) -> None:
    """Explain a topology: per-node plan, bytes per hop, the privacy contract, an ASCII drawing."""
    from rich.table import Table  # rich: imported by the commands that print tables, never by a node
    from meshsl.api.topology import plan_of  # torch: not for `meshsl --help`
    from meshsl.plans.explain import ascii_graph
    topo = load(topology, overrides=overrides_of(assignments, device))
    document = plan_of(topo, cuts=cuts)
    if schedule and not as_json:
        _print_schedule(document["schedule"])
        return
    if as_json:
        out.print_json(json.dumps(document, default=str))
        return
    out.print(f"[bold]{topo.spec.name}[/bold]  hash {topo.hash}  coordinator {topo.coordinator}")
    out.print("configurations: " + ", ".join(document["configurations"]))
    out.print(ascii_graph(topo), markup=False, highlight=False)
    nodes = Table(title="nodes")
    for column in ("node", "party", "endpoint", "segments", "params", "fwd FLOPs/sample", "peers"):
        nodes.add_column(column)
    for name, p in document["nodes"].items():
        nodes.add_row(name, p["party"], p["endpoint"] or "(dials out)", ", ".join(p["segments"]), f"{p['parameters']:,}",
                      f"{p['forward_flops_per_sample']:,}", ", ".join(p["peers"]))
    out.print(nodes)
    edges = Table(title="hops (bytes per sample)")
    for column in ("edge", "shape", "crosses party", "forward B", "backward B", "codec fwd/bwd"):
        edges.add_column(column)
    for name, e in document["edges"].items():
        edges.add_row(name, str(e["shape"]), "yes" if e["cross_party"] else "no",
                      *(f"{e[f'{d}_bytes_per_sample']:,}" + (f" (wire {e[f'{d}_wire_bytes_per_sample']:,})"
                                                                   if e[f"{d}_codec"] != "none" else "")
                        for d in ("forward", "backward")),
                      f"{e['forward_codec']}/{e['backward_codec']}")
    out.print(edges)
    contract = Table(title="privacy contract: what each party sends and receives")
    for column in ("party", "node", "sends/receives", "edge", "tensor", "peer (party)"):
        contract.add_column(column)
    for name, p in document["nodes"].items():
        for verb, rows in (("sends", p["sends"]), ("receives", p["receives"])):
            for t in rows:
                contract.add_row(p["party"], name, f"{verb} {t['direction']}", t["edge"],
                                 f"{t['dtype']}\\[{', '.join(map(str, t['shape']))}] ({t['codec']})", f"{t['peer']} ({t['peer_party']})")
    out.print(contract)
    _print_kept_preprocessing(document)
    if document.get("alignment"):
        from meshsl.cli.align import print_alignment_step  # rich: never in a node process
        print_alignment_step(out, document["alignment"])
    from meshsl.cli.privacy import print_plan_privacy  # rich: never in a node process
    print_plan_privacy(document)
    if cuts:
        _print_cut_candidates(document["cut_candidates"])
    for warning in topo.warnings:
        out.print(f"[yellow]warning:[/yellow] {warning}")
    from meshsl.cli.common import console
    for warning in document["leakage_warnings"]:  # near-total leakage at the declared cuts, with what to do
        console.print(f"[yellow]warning:[/yellow] {warning}", markup=True, highlight=False, soft_wrap=True)


def _print_kept_preprocessing(document: dict) -> None:
    for row in document.get("preprocessing", []):
        out.print(f"{row['party']} ({row['node']}): preprocessing of {row['source']!r} (impute {row['impute']}, "
                  f"scale {row['scale']}) is fitted on its own training rows and kept in "
                  f"{', '.join(row['segments'])}; it is never sent")


def _print_cut_candidates(candidates: list[dict]) -> None:
    from rich.table import Table  # rich: imported by the commands that print tables, never by a node
    table = Table(title="cut-layer candidates")
    for column in ("segment", "cut after", "bytes/sample", "client params", "client FLOPs/sample", "dCor (leakage)"):
        table.add_column(column)
    for c in candidates:
        table.add_row(c["segment"], c["cut_after"], f"{c['bytes_per_sample']:,}", f"{c['client_parameters']:,}",
                      f"{c['client_flops_per_sample']:,}", f"{c['dcor']:.3f}")
    out.print(table)


def _print_schedule(schedule: dict) -> None:
    """One line per node: the order it executes in every training step of this shape (machines/schedules.py)."""
    staleness = f", staleness {schedule['staleness']}: rounds interleave oldest first" if schedule["staleness"] else ""
    out.print(f"schedule {schedule['policy']}, {schedule['micro_batches']} micro-batches, lanes "
              f"{schedule['lanes']}{staleness}", markup=False, highlight=False)
    width = max(map(len, schedule["train"]), default=0)
    for node, order in schedule["train"].items():
        out.print(f"  {node:<{width}}  {order}", markup=False, highlight=False)
