"""The run summary as tables (`meshsl run`, `meshsl simulate`)."""
from __future__ import annotations

from meshsl.cli.common import out


def print_summary(summary: dict) -> None:
    from rich.table import Table  # rich: never in a node process
    table = Table(title=f"{summary['topology']}: {summary['steps']} steps, {summary['epochs']} epochs, "
                        f"{summary['samples_per_s']:.0f} samples/s, {summary['wall_seconds']:.1f} s")
    for column in ("task", "train loss", "eval loss", "eval accuracy", "other"):
        table.add_column(column)
    for name, t in summary["tasks"].items():
        ev = t.get("eval", {})
        other = ", ".join(f"{k}={ev[k]:.3f}" for k in ("f1", "auroc", "perplexity") if isinstance(ev.get(k), float))
        start = t.get("eval_start", {}).get("perplexity")
        other += f" (at start {start:.1f})" if isinstance(start, float) else ""
        table.add_row(name, _figure(t["train"].get("loss")), _figure(ev.get("loss")), _figure(ev.get("accuracy")),
                      other)  # an mse task has no accuracy: "-", not nan
    out.print(table)
    edges = Table(title="bytes per edge")
    for column in ("edge", "forward", "backward", "per sample"):
        edges.add_column(column)
    for name, e in summary["edges"].items():
        edges.add_row(name, f"{e['forward_bytes']:,}", f"{e['backward_bytes']:,}",
                      f"{summary['bytes_per_sample'][name]:.0f}")
    out.print(edges)
    if summary.get("rejected_messages"):
        out.print(f"[yellow]rejected messages:[/yellow] {summary['rejected_messages']}")
    from meshsl.cli.privacy import print_run_privacy  # rich: never in a node process
    print_run_privacy(summary)


def _figure(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"

