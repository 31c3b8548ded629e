"""`meshsl simulate`: every logical node in this process (in-process engine) or on Ray actors (`--engine ray`)."""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from meshsl.cli.common import DEVICE_HELP, SET_HELP, fail, load, overrides_of
from meshsl.cli.summary import print_summary
from meshsl.errors import ConfigError, MeshslError

ENGINES = ("inprocess", "ray")


def simulate(topology: Path = typer.Argument(..., help="topology YAML"),
             engine: str = typer.Option("inprocess", "--engine", help="inprocess (one process) or ray (Ray actors)"),
             ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                                       help="a running Ray cluster (auto, host:port); default: a local one"),
             steps: Optional[int] = typer.Option(None, help="train this many steps (overrides epochs)"),
             epochs: Optional[int] = typer.Option(None, help="train this many epochs"),
             no_eval: bool = typer.Option(False, "--no-eval", help="skip evaluation"),
             summary_json: Optional[Path] = typer.Option(None, "--summary-json", help="write the summary here"),
             timeout: Optional[float] = typer.Option(None, help="give up after this many seconds"),
             assignments: list[str] = typer.Option([], "--set", help=SET_HELP),
             device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP)) -> None:
    """Simulate a topology: logical nodes as asyncio tasks (in-process transport), here or on Ray actors."""
    from meshsl.coordinator.runtime import RunOptions  # torch: not for `meshsl --help`
    if engine not in ENGINES:
        fail(ConfigError(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}"))
    if ray_address is not None and engine != "ray":
        fail(ConfigError("--ray-address needs --engine ray"))
    overrides = overrides_of(assignments, device)
    topo = load(topology, overrides=overrides)
    for warning in topo.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if engine == "inprocess":  # a Ray actor checks its own machine
        from meshsl.launch.preflight import preflight  # torch: not for `meshsl --help`
        try:
            preflight(topo, ports=False)  # a CUDA device this machine lacks fails now, naming the node
        except ConfigError as exc:
            fail(exc)
    options = RunOptions(steps=steps, epochs=epochs, evaluate=not no_eval)
    try:
        if engine == "ray":
            from meshsl.config.loader import load_document  # start-up: `meshsl --help` parses nothing
            from meshsl.launch.ray_engine import simulate_on_ray  # torch: not for `meshsl --help`
            document = load_document(topology, overrides)
            result = simulate_on_ray(topo, document, options, address=ray_address, timeout=timeout)
            summary = result["summary"]
            summary["engine"] = {"name": "ray", "actors": result["actors"]}
        else:
            from meshsl.launch.simulate import simulate as simulate_here  # torch: not for `meshsl --help`
            coroutine = simulate_here(topo, options)
            summary, _ = asyncio.run(asyncio.wait_for(coroutine, timeout) if timeout else coroutine)
            summary["engine"] = {"name": "inprocess"}
    except MeshslError as exc:
        fail(exc, 1)
    except TimeoutError:
        fail(MeshslError(f"the simulation did not finish within {timeout:.0f}s"), 1)
    print_summary(summary)
    from meshsl.cli.privacy import print_leakage_warnings  # rich: never in a node process
    print_leakage_warnings(summary)
    if summary_json:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(summary, indent=2, default=float))


def mount(app: typer.Typer) -> None:
    app.command()(simulate)
