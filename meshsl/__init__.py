"""meshsl: declarative, pipelined, fault-tolerant split learning over ZeroMQ.

From Python (docs/api.md)::

    import meshsl
    topology = meshsl.load("topologies/vertical.yaml", overrides={"training.optimizer.lr": 0.01})
    result = meshsl.run(topology, steps=50, free_ports=True)   # every node as a local process
    print(result.metrics["cancer"]["accuracy"], result.weights_dir)

The names below are imported on first use: ``import meshsl`` stays cheap (a node process starts with it).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meshsl.errors import (ConfigError, ConfigErrors, MeshslError, PeerFailed, PreflightError, RunAborted,
                           RunCancelled)

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from meshsl.api import (JobClient, Run, RunResult, Topology, assemble, evaluate, export,  # noqa: F401
                            load, load_model, plan, predict, run, simulate, start, validate)

_API = ("JobClient", "Run", "RunResult", "Topology", "assemble", "evaluate", "export", "load", "load_model", "plan",
        "predict", "run", "simulate", "start", "validate")

__all__ = ["JobClient", "Run", "RunResult", "Topology", "assemble", "evaluate", "export", "load", "load_model", "plan",
           "predict", "run", "simulate", "start", "validate", "ConfigError", "ConfigErrors", "MeshslError",
           "PeerFailed", "PreflightError", "RunAborted", "RunCancelled", "__version__"]


def _api(name: str) -> Any:
    import meshsl.api  # torch and the runtime: only when the API is used
    return getattr(meshsl.api, name)


def __getattr__(name: str) -> Any:
    if name in _API:
        return _api(name)
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("meshsl")
        except PackageNotFoundError:
            return "0+unknown"
    raise AttributeError(f"module 'meshsl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
