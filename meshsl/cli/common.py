"""What every command shares: the consoles, the one-line error exit, loading a topology, log options."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from meshsl.errors import ConfigError
from meshsl.cli.logs import configure_logging


class _LazyConsole:
    """A rich Console made on first use: importing rich costs ~0.1 s, and `meshsl node` prints no tables."""

    def __init__(self, **options) -> None:
        self._options, self._console = options, None

    def real(self):
        if self._console is None:
            from rich.console import Console  # rich takes ~0.1 s: only when something is printed
            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str):
        return getattr(self.real(), name)


console = _LazyConsole(stderr=True)
# Piped or captured output (CI logs, `| less`) gets 160 columns instead of Rich's 80, so tables do not wrap.
out = _LazyConsole(soft_wrap=True, width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)


def fail(exc: Exception, code: int = 2) -> None:
    problems = getattr(exc, "problems", None) or [exc]
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    raise typer.Exit(code)


def load(path: Path, base_dir: Optional[Path] = None, overrides: Optional[list[str]] = None, data: bool = True):
    """The checked topology of `path` (`overrides`: `--set KEY.PATH=VALUE` lines), or an `error:` exit 2.
    `data=False`: without shape inference, so no data file is read (monitoring only needs the nodes)."""
    from meshsl.config.loader import load_spec  # start-up: `meshsl --help` parses nothing
    from meshsl.topology.model import topology_from_spec  # start-up: `meshsl --help` parses nothing
    try:
        return topology_from_spec(load_spec(path, overrides), str(path), path.parent if base_dir is None else base_dir,
                                  infer_shapes=data)
    except ConfigError as exc:
        fail(exc)


def overrides_of(assignments: list[str], device: Optional[str] = None) -> list[str]:
    """`--set` lines plus `--device D` (every node's device), in the order they apply."""
    return [*assignments, *([f"nodes.*.device={device}"] if device else [])]


SET_HELP = ("KEY.PATH=VALUE: override a topology key, validated like the YAML (repeatable; e.g. "
            "training.optimizer.lr=0.01, nodes.server.device=cuda:1, nodes.*.threads=2); the topology hash changes")
DEVICE_HELP = "run every node on this device (cpu, cuda, cuda:N): the same as --set nodes.*.device=DEVICE"


def version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version  # only for --version
        try:
            print(f"meshsl {version('meshsl')}")
        except PackageNotFoundError:
            print("meshsl (not installed: run from a checkout)")
        raise typer.Exit(0)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_logging: dict[str, Any] = {"level": "WARNING", "json": False}  # what the root options chose (nodes re-apply it with their name)


def _configure_logging(level: str, node: Optional[str] = None) -> str:
    level = level.upper()
    if level not in LOG_LEVELS:
        fail(ConfigError(f"--log-level {level!r}: expected one of {', '.join(LOG_LEVELS)}"))
    _logging["level"] = level
    configure_logging(level, node=node, json=_logging["json"])
    return level


def root(log_level: str = typer.Option("WARNING", "--log-level", help="DEBUG, INFO, WARNING or ERROR"),
         log_format: str = typer.Option("text", "--log-format", envvar="MESHSL_LOG_FORMAT",
                                        help="text or json: one line per event either way"),
         version: bool = typer.Option(False, "--version", is_eager=True, callback=version_callback,
                                      help="print the version and exit")) -> None:
    if log_format not in ("text", "json"):
        fail(ConfigError(f"--log-format {log_format!r}: expected text or json"))
    _logging["json"] = log_format == "json"
    os.environ["MESHSL_LOG_FORMAT"] = log_format  # node processes started by `meshsl run` inherit it
    _configure_logging(log_level)
