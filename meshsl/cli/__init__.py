"""The `meshsl` command line: `app` wires one module per command group (meshsl/cli/*.py)."""
from meshsl.cli.app import _starting_a_node, app, main
from meshsl.cli.common import _logging, fail, load

__all__ = ["_logging", "_starting_a_node", "app", "fail", "load", "main"]
