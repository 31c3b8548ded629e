"""`meshsl audit`: per cut edge, how much of the raw input its activations leak (dCor, inversion probe)
and how much of the labels the gradients sent back leak (norm, cosine and clustering attacks)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from meshsl.cli.common import fail, load
from meshsl.errors import MeshslError

# Piped output gets 160 columns (not Rich's 80) so edge names are not cut.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)


def _fmt(value, pattern: str = "{:.3f}") -> str:
    return pattern.format(value) if isinstance(value, (int, float)) else "-"


def audit(topology: Optional[Path] = typer.Argument(None, help="topology YAML (with --run: the one recorded)"),
          steps: Optional[int] = typer.Option(None, "--steps", min=1, help="train this many steps first"),
          weights: Optional[Path] = typer.Option(None, "--weights",
                                                 help="audit the weights `meshsl run --weights-out DIR` saved"),
          run: Optional[Path] = typer.Option(None, "--run", help="attack the trajectory a run recorded here "
                                                                 "(privacy[].record: DIR)"),
          trajectory: bool = typer.Option(False, "--trajectory", help="train in-process recording every cut "
                                                                      "edge, then attack the trajectory"),
          probe_epochs: int = typer.Option(200, "--probe-epochs", min=0, help="inversion decoder training epochs"),
          as_json: bool = typer.Option(False, "--json", help="machine-readable")) -> None:
    """Leakage audit: dCor(raw input, activation), a model-inversion probe and label-inference attacks on the
    gradients, for every party-crossing edge; with --run or --trajectory, the label attacks on what the
    feature party received, step by step."""
    from meshsl.apps.audit import audit as run_audit  # torch: not for `meshsl --help`
    if run is not None or trajectory:
        return audit_trajectory(topology, run, steps, as_json)
    if topology is None:
        print("error: a topology YAML is needed (or --run DIR)", file=sys.stderr)
        raise typer.Exit(2)
    topo = load(topology)
    if weights is not None and steps is not None:
        print("error: --steps and --weights exclude each other (weights are audited as saved)", file=sys.stderr)
        raise typer.Exit(2)
    try:
        document = run_audit(topo, steps=steps, weights=weights, probe_epochs=probe_epochs)
    except MeshslError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(document, indent=2, default=float))
        return
    trained = document.get("trained")
    if trained:
        evals = ", ".join(f"{t} accuracy {r['accuracy']:.3f}" for t, r in trained["eval"].items() if "accuracy" in r)
        out.print(f"trained {trained['steps']} steps in-process ({evals or 'no eval'})")
    else:
        out.print(f"weights from {document['weights']}")
    table = Table(title=f"leakage audit of {document['topology']} (held-out rows)")
    for column in ("edge", "parties", "raw inputs", "protection", "dCor", "inversion rel. error", "samples"):
        table.add_column(column)
    for name, e in document["edges"].items():
        protection = []
        if e["nopeek"]:
            protection.append(f"NoPeek {e['nopeek']:g}")
        if e["dp"]:
            protection.append(f"DP clip {e['dp']['clip_norm']:g} sigma {e['dp']['noise_multiplier']:g}")
        if e["forward_codec"] != "none":
            protection.append(e["forward_codec"])
        table.add_row(name, f"{e['producer_party']} -> {e['consumer_party']}", ", ".join(e["raw_sources"]) or "-",
                      ", ".join(protection) or "none", _fmt(e.get("dcor")), _fmt(e.get("inversion_relative_error")),
                      _fmt(e.get("n_samples"), "{}"))
    out.print(table)
    out.print("dCor: 0 independent .. 1 a similarity transform of the input; inversion error: decoder MSE / "
              "mean-guess MSE (1 nothing recovered, 0 exact reconstruction)")
    print_token_recovery(document)
    print_label_audit(document)
    print_leakage_warnings(document, "audit")


def print_token_recovery(document: dict) -> None:
    """LLM cuts: the share of the client's tokens the receiving party reads back from the hidden states."""
    rows = {n: e["token_recovery"] for n, e in document["edges"].items() if e.get("token_recovery")}
    if not rows:
        return
    table = Table(title="token recovery from the hidden states crossing each LLM cut (held-out sequences)")
    for column in ("edge", "nearest embedding", "learned inversion", "commonest token (chance)", "positions"):
        table.add_column(column)
    for name, r in rows.items():
        table.add_row(name, f"{r['nearest_embedding_recovered']:.1%}", f"{r['learned_inversion_recovered']:.1%}",
                      f"{r['commonest_token_share']:.1%}", str(r["positions"]))
    out.print(table)


def audit_trajectory(topology: Optional[Path], run: Optional[Path], steps: Optional[int], as_json: bool) -> None:
    """`--run DIR` (a run's recordings) or `--trajectory` (record in-process first)."""
    import tempfile
    from meshsl.apps.audit_trajectory import audit_run, load_recordings, record_and_audit
    try:
        if run is None:
            if topology is None:
                print("error: --trajectory needs a topology YAML", file=sys.stderr)
                raise typer.Exit(2)
            with tempfile.TemporaryDirectory(prefix="meshsl-trajectory-") as directory:
                document, _ = record_and_audit(load(topology), Path(directory), steps)
        else:
            if topology is None:
                meta = load_recordings(run)[1]
                if not meta.get("topology_file"):
                    print("error: the recordings do not name their topology file; give it", file=sys.stderr)
                    raise typer.Exit(2)
                topology = Path(meta["topology_file"])
            document = audit_run(load(topology), run)
    except MeshslError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(document, indent=2, default=float))
        return
    print_trajectory_audit(document)


def print_trajectory_audit(document: dict) -> None:
    """Per edge and phase: the realistic figures and the upper bounds side by side."""
    for name, edge in document["label_edges"].items():
        defence = edge["defence"]
        text = "no defence" if defence is None else ", ".join(f"{k} {v}" for k, v in defence.items()
                                                              if k not in ("seed", "delta", "amplification"))
        for task, r in edge["tasks"].items():
            table = Table(title=f"label leakage on the wire: {name} ({r['party']} <- {r['label_party']}), "
                                f"task {task}, {text}; {r['rows']} training rows, "
                                f"{r['held_out_rows_dropped']} held-out rows dropped")
            for column in ("phase", "steps", "norm AUC realistic", "direction AUC realistic", "norm AUC upper bound",
                           "direction AUC upper bound", "norm AUC paper side", "best step norm / dir"):
                table.add_column(column)
            for phase, p in r["phases"].items():
                real, upper, best = p["realistic"], p["upper_bound"], p["best_single_step"]
                table.add_row(phase, f"{p['first_step']}-{p['last_step']}", _fmt(real["norm_auc"]),
                              _fmt(real["direction_auc"]), _fmt(upper["norm_auc"]), _fmt(upper["direction_auc"]),
                              _fmt(real["norm_auc_paper_side"]),
                              f"{_fmt(best['norm_auc'])} / {_fmt(best['direction_auc'])}")
            out.print(table)
    out.print("assumptions:\n" + "\n".join(f"  - {a}" for a in document["assumptions"]))


def print_label_audit(document: dict) -> None:
    """Label-inference attacks per edge whose gradients go back to a party without the labels."""
    labels = document.get("label_edges") or {}
    if labels:
        table = Table(title="label leakage: attacks on the gradients sent back (all rows, final model)")
        for column in ("edge", "parties", "task (labels of)", "defence", "norm AUC", "cosine AUC",
                       "cluster acc. (chance)", "samples"):
            table.add_column(column)
        for name, e in labels.items():
            defence = e["defence"]
            text = "none" if defence is None else ", ".join(f"{k} {v}" for k, v in defence.items()
                                                            if k not in ("seed", "delta", "amplification"))
            for task, r in e["tasks"].items():
                table.add_row(name, f"{e['producer_party']} <- {e['consumer_party']}", f"{task} ({r['label_party']})",
                              text, _fmt(r.get("norm_auc")), _fmt(r.get("cosine_auc")),
                              f"{r['cluster_accuracy']:.3f} ({r['chance_accuracy']:.3f})", str(r["n_samples"]))
        out.print(table)
        out.print("AUC 0.5 is chance, 1.0 every label recovered (norm and cosine attacks: binary labels only); "
                  "clustering: k-means on the gradient directions, best match of clusters to classes")
    trained = document.get("trained") or {}
    if trained.get("live_label_leakage"):
        out.print("live norm-attack AUC at the label holder (last sampled step): " + ", ".join(
            f"{edge} {auc:.3f}" for edge, auc in trained["live_label_leakage"].items()))
    if document.get("privacy_budget"):
        print_budget(document["privacy_budget"])


def print_plan_privacy(document: dict) -> None:
    """`meshsl plan`: the control figures that cross parties, and the privacy budget."""
    figures = Table(title="privacy contract: figures in control messages that cross parties")
    for column in ("party", "node", "figure", "about", "to (party)", "when"):
        figures.add_column(column)
    for f in document.get("control_contract", []):
        figures.add_row(f["party"], f["node"], f["figure"], f["about"], f"{f['to']} ({f['to_party']})", f["when"])
    if figures.rows:
        out.print(figures)
    budget = document.get("privacy_budget")
    if budget:
        print_budget(budget)


def print_run_privacy(summary: dict) -> None:
    """`meshsl run`: budgets spent, the label holder's last label-attack AUC, hijack-check verdicts."""
    if summary.get("privacy_budget") and summary["privacy_budget"].get("edges"):
        print_budget(summary["privacy_budget"])
    if summary.get("label_leakage"):
        out.print("label leakage (attack AUC on the gradients sent, sides chosen without labels, last 5 sampled "
                  "steps): " + ", ".join(
            f"{edge} {auc:.3f}" for edge, auc in summary["label_leakage"].items()))
    for node, verdict in (summary.get("hijack_check") or {}).items():
        state = ("[red]HIJACKING SUSPECTED[/red]" if verdict["hijacked"] else "no sign of hijacking") \
            if verdict["decided"] else "undecided (too few probes)"
        out.print(f"hijack check at {node}: {state} (score {_fmt(verdict['score'])}, "
                  f"{verdict['fake_batches']} probes)")


def print_leakage_warnings(document: dict, kind: str = "run") -> None:
    """Near-total leakage (meshsl.privacy.leakage_warnings) as `warning:` lines on stderr, with what to do."""
    from meshsl.privacy import leakage_warnings  # pure; no torch
    from meshsl.cli.common import console
    warnings_of: dict[str, Callable[[Any], list[str]]] = {
        "run": leakage_warnings.run_warnings, "plan": leakage_warnings.plan_warnings,
        "audit": leakage_warnings.audit_warnings}
    found = warnings_of[kind](document)
    for warning in found:
        console.print(f"[yellow]warning:[/yellow] {warning}", markup=True, highlight=False, soft_wrap=True)


def print_budget(budget: dict) -> None:
    table = Table(title=f"privacy budget over {budget['steps']} steps (Opacus RDP accountant)")
    for column in ("edge", "mechanism", "protects", "sigma", "sample rate x releases", "epsilon", "delta", "target"):
        table.add_column(column)
    for e in budget["edges"]:
        sigma = f"{e['noise_multiplier']:.3f}" + (" (calibrated)" if e["calibrated"] else "")
        table.add_row(e["edge"], e["mechanism"], e["protects"], sigma, f"{e['sample_rate']:.3g} x {e['releases']}",
                      _fmt(e["epsilon"]), f"{e['delta']:g}", _fmt(e["target_epsilon"], "{:g}"))
    for party, kinds in budget["parties"].items():
        for what, figure in kinds.items():
            table.add_row("-", "party total", f"{what} of {party}", "", figure.get("via", ""),
                          _fmt(figure["epsilon"]), f"{figure['delta']:g}", "")
    out.print(table)


def mount(app: typer.Typer) -> None:
    app.command("audit")(audit)
