"""The `meshsl` command line, wired together: one module per command group, nothing else here."""
from __future__ import annotations

import sys
from pathlib import Path

import typer

from meshsl.cli import common, monitoring, node, plan, run

app = typer.Typer(help="meshsl: declarative, pipelined, fault-tolerant split learning over ZeroMQ.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
app.callback()(common.root)
app.add_typer(monitoring.app, name="monitoring")
app.command()(plan.validate)
app.command()(plan.plan)
app.command()(run.run)
app.command()(node.node)


def _mount_optional() -> None:
    """Command groups a node process never needs. Their modules import rich at the top (start-up to the
    first step counts; docs/performance.md), so they are imported only when another command runs."""
    from meshsl.cli import align, keys, llm, model, privacy, simulate, sites  # rich: never in a node process
    app.add_typer(keys.app, name="keys")
    app.add_typer(llm.app, name="llm")
    for group in (privacy, model, align, simulate, sites):  # audit; predict, export, assemble, evaluate; align; simulate; sites and jobs
        group.mount(app)


def _starting_a_node(argv: list[str]) -> bool:
    """This process is `meshsl [root options] node ...`: it needs none of the optional commands, whose
    modules import rich (start-up to the first step counts; docs/performance.md)."""
    entry = Path(argv[0]) if argv else None
    if entry is None or not (entry.name == "meshsl" or (entry.name == "__main__.py" and entry.parent.name == "meshsl")):
        return False
    args = iter(argv[1:])
    for arg in args:
        if arg in ("--log-level", "--log-format"):
            next(args, None)
        elif not arg.startswith("-"):
            return arg == "node"
    return False


if not _starting_a_node(sys.argv):
    _mount_optional()


def main() -> None:
    app()
