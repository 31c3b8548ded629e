"""Using a trained model from Python: predict or evaluate through the parties' nodes, export one party's
segments, assemble every party's export into one model (see docs/using-the-model.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from meshsl.api.topology import TopologySource, document_of, load
from meshsl.launch.launcher import default_run_dir

PathLike = Union[str, Path]


def _launch_options(topology: TopologySource, load_options: dict) -> tuple:
    topo = load(topology, **load_options)
    document, base_dir = document_of(topo)
    return topo, Path(base_dir) / Path(topo.source).name, document


def predict(topology: TopologySource, weights: PathLike, inputs: Mapping[str, PathLike], output: PathLike, *,
            remote: Iterable[str] = (), batch_size: Optional[int] = None, run_dir: Optional[PathLike] = None,
            free_ports: bool = True, timeout: Optional[float] = None, **load_options: Any) -> dict:
    """Forward-only prediction through the same nodes and hops as training (``meshsl predict``).

    Args:
        weights: the folder of saved segment weights (``RunResult.weights_dir``).
        inputs: each feature holder's own rows, ``{"hospital_a": "a.csv", ...}`` (CSV or .npy).
        output: each task-output owner writes ``output/<task>.csv`` there.
        remote: nodes their owners run elsewhere (``meshsl node NAME --predict``).
    Returns the prediction summary (rows per task, files written, rows/s).
    """
    from meshsl.apps.predict import predict_local  # torch
    _, path, document = _launch_options(topology, load_options)
    return predict_local(path, Path(weights), {n: Path(p) for n, p in inputs.items()}, Path(output),
                         remote=tuple(remote), run_dir=Path(run_dir) if run_dir else default_run_dir("predict"),
                         free_ports=free_ports, batch_size=batch_size, timeout=timeout, document=document)


def evaluate(topology: TopologySource, weights: PathLike, *, run_dir: Optional[PathLike] = None,
             free_ports: bool = True, timeout: Optional[float] = None, **load_options: Any) -> dict:
    """Held-out metrics per task of saved weights: one evaluation round, no training (``meshsl evaluate``)."""
    from meshsl.apps.predict import evaluate_local  # torch
    _, path, document = _launch_options(topology, load_options)
    return evaluate_local(path, Path(weights), run_dir=Path(run_dir) if run_dir else default_run_dir("evaluate"),
                          free_ports=free_ports, timeout=timeout, document=document)


def export(topology: TopologySource, weights: PathLike, node: str, out_dir: PathLike,
           **load_options: Any) -> list[Path]:
    """One party's own segments as ``<segment>.safetensors`` + ``<segment>.json`` (``meshsl export``),
    loadable with plain torch; returns the files written."""
    from meshsl.apps.export import export_node  # torch
    return export_node(load(topology, **load_options), Path(weights), node, Path(out_dir))


def assemble(topology: TopologySource, export_dirs: Iterable[PathLike], out: PathLike, *,
             client: Optional[str] = None, **load_options: Any) -> Path:
    """Every owner's export combined into one single-process model (``meshsl assemble``): ``model.pt`` or a
    folder; refused while any owner's export is missing. Load it with `load_model`."""
    from meshsl.apps.export import assemble as assemble_exports  # torch
    return assemble_exports(load(topology, **load_options), [Path(d) for d in export_dirs], Path(out), client)


def load_model(path: PathLike):
    """An assembled model (`assemble`) as a torch module: ``model({data source: tensor}) -> {task: output}``."""
    from meshsl.apps.export import load_assembled  # torch
    return load_assembled(path)
