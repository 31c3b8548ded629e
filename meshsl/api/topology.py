"""Topologies from Python: load a YAML file or build one from a dict, apply overrides, validate, plan."""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from meshsl.config.loader import load_document, parse_spec
from meshsl.config.overrides import apply_overrides, device_override
from meshsl.topology.model import Topology, topology_from_spec

TopologySource = Union[str, Path, Mapping[str, Any], Topology]
Overrides = Union[Mapping[str, Any], Iterable[str], None]

# What each Topology was built from (the YAML document after overrides, the folder relative paths start
# from): `run` hands exactly that to the node processes. Kept beside the frozen topology, gone with it.
_ORIGINS: "weakref.WeakKeyDictionary[Topology, tuple[dict, Path]]" = weakref.WeakKeyDictionary()


def load(source: TopologySource, *, overrides: Overrides = None, device: Optional[str] = None,
         base_dir: Union[str, Path, None] = None) -> Topology:
    """A checked topology (schema, graph, privacy lint, shape inference) from a YAML path or a dict.

    Args:
        source: a topology YAML file, a dict with the same keys (``{"name": ..., "nodes": [...], ...}``),
            or a Topology (returned as is unless overrides are given).
        overrides: key paths and values applied before validation, like ``meshsl run --set``:
            ``{"training.optimizer.lr": 0.01, "nodes.server.device": "cuda:1"}`` or
            ``["training.steps=20"]``. Lists are indexed by position, entry name or ``*``.
        device: every node's device (``cpu``, ``cuda``, ``cuda:N``), like ``--device``.
        base_dir: the folder relative data paths start from (default: the file's folder, or the working
            directory for a dict).

    Raises:
        ConfigError: the topology is invalid; a ConfigErrors lists every problem, each naming the key path.
    """
    changes = _as_list(overrides) + _as_list(device_override(device) if device else None)
    if isinstance(source, Topology):
        if not changes:
            return source
        document, origin = document_of(source)
        return _build(apply_overrides(document, changes, "overrides"), source.source, Path(base_dir or origin))
    if isinstance(source, Mapping):
        document = apply_overrides(dict(source), changes, "overrides")
        return _build(document, "<dict>", Path(base_dir) if base_dir is not None else Path.cwd())
    path = Path(source)
    document = load_document(path, changes)
    return _build(document, str(path), Path(base_dir) if base_dir is not None else path.parent)


def _as_list(overrides: Overrides) -> list:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{k}={_yaml_value(v)}" for k, v in overrides.items()]
    return [overrides] if isinstance(overrides, str) else list(overrides)


def _yaml_value(value: Any) -> str:
    import yaml  # values of a Python mapping keep their type through the KEY=VALUE text form
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("...").strip()


def _build(document: Any, source: str, base_dir: Path) -> Topology:
    topology = topology_from_spec(parse_spec(document, source), source, base_dir)
    _ORIGINS[topology] = (document, base_dir)
    return topology


def document_of(topology: Topology) -> tuple[dict, Path]:
    """The document a topology was built from and its base folder (a topology built by other means:
    its spec as data, which validates to the same topology and hash)."""
    if topology in _ORIGINS:
        return _ORIGINS[topology]
    return topology.spec.model_dump(mode="json", exclude_unset=True), Path(topology.base_dir)


def validate(source: TopologySource, **load_options: Any) -> list[str]:
    """Check a topology like ``meshsl validate``; returns its warnings (e.g. shallow cuts).

    Raises:
        ConfigError: the topology is invalid (every problem with its key path).
    """
    return list(load(source, **load_options).warnings)


def plan(source: TopologySource, *, cuts: bool = False, **load_options: Any) -> dict:
    """What ``meshsl plan [--cuts] --json`` prints: per-node plans, bytes per hop, the privacy contract,
    ``leakage_warnings`` (near-total leakage at the declared cuts) and, with ``cuts``, ``cut_candidates``
    (every layer boundary rated by bytes, compute and dCor after a short training)."""
    return plan_of(load(source, **load_options), cuts=cuts)


def plan_of(topology: Topology, cuts: bool = False) -> dict:
    """The plan document of a loaded topology (`plan`; the CLI's `meshsl plan` prints it), with
    `schedule`: every node's compute order of a training step (machines/schedules.py)."""
    from meshsl.plans.explain import plan_document  # torch: shape inference has loaded it already
    from meshsl.privacy.leakage_warnings import plan_warnings
    from meshsl.apps.privacy_cuts import cut_candidates
    from meshsl.machines.schedules import schedule_document
    document = plan_document(topology)
    candidates = cut_candidates(topology, **({} if cuts else {"train_steps": 0}))
    if cuts:
        document["cut_candidates"] = candidates
    document["leakage_warnings"] = plan_warnings(candidates)
    document["schedule"] = schedule_document(topology)
    return document

