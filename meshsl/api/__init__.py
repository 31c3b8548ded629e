"""The public Python API of meshsl (also importable from ``meshsl`` itself): load, validate and plan a
topology, train it with local node processes (`run`, `start`) or in this process (`simulate`), and use
the trained model (`predict`, `evaluate`, `export`, `assemble`, `load_model`), and submit jobs to a
project's sites (`JobClient`). See docs/api.md and docs/sites.md."""
from meshsl.api.model import assemble, evaluate, export, load_model, predict
from meshsl.api.result import RunResult
from meshsl.api.runs import Run, run, simulate, start
from meshsl.api.topology import load, plan, validate
from meshsl.apps.sites.client import JobClient  # jobs submitted to a project's sites (docs/sites.md)
from meshsl.topology.model import Topology

__all__ = ["JobClient", "Run", "RunResult", "Topology", "assemble", "evaluate", "export", "load", "load_model", "plan", "predict",
           "run", "simulate", "start", "validate"]
