"""`meshsl audit --run DIR`: label-inference attacks on what a party actually received, step by step.

A run with `privacy[].record` (or `meshsl audit TOPOLOGY --trajectory`, which trains in-process with every
cut edge recorded) leaves, at each receiving node, the gradient rows it decoded from the wire with the sample
id of every row (meshsl.compute.trajectory_recorder). This module attacks those recordings per training
step (meshsl.privacy.trajectory_attacks) and reports each attack per phase: steps 0-4, steps 5-14, each
epoch, the last epoch and all steps, as the realistic figure and the upper bound side by side.

The auditor holds the labels (to score the attacks); the attacks use only the receiving party's rows and
the class prior. Held-out rows never send a gradient; any recorded row outside the training pool is
dropped and counted.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from meshsl.align.outcomes import aligned_rows
from meshsl.apps.audit import label_tasks, quiet_copy
from meshsl.compute.trajectory_recorder import RECORD_FORMAT
from meshsl.data import load_source
from meshsl.errors import ConfigError
from meshsl.schedule.steps import sample_pools
from meshsl.privacy.trajectory_attacks import attack_step, phase_figures
from meshsl.coordinator.runtime import RunOptions
from meshsl.launch.simulate import simulate
from meshsl.topology.model import topology_from_spec

ASSUMPTIONS = [
    "the attacker is the party that received the rows (the producer's node of the edge) and uses only them, "
    "the sample id of each row and the class prior (share of positives; positives = the minority class)",
    "attacks run per training step on that step's rows (the model changes between steps); a phase's figure "
    "is the mean of its steps' AUCs",
    "realistic direction: leading principal direction of the step's unit rows, positive side = the side whose "
    "count is nearer the prior; realistic norm: +-||g||, side agreeing with that direction split",
    "upper bound: the side chosen with the true labels per phase (norm), and the cosine attack with labelled "
    "positive references in every step (direction); best_single_step is the best step either side (noisy: "
    "~0.65 at chance for 32 rows)",
    "held-out rows never send a gradient and are never counted",
]
PHASES_FIRST = ((0, 4), (5, 14))


@dataclass
class Recording:
    node: str
    party: str
    edge: str
    direction: str
    arrays: dict[str, np.ndarray]


def load_recordings(directory: Path) -> tuple[list[Recording], dict]:
    """Every node's recordings under `directory` (one sub-directory per node); and the first meta.json."""
    directory = Path(directory)
    metas = sorted(directory.glob("*/meta.json"))
    if not metas:
        raise ConfigError("no recordings here (a run records with privacy[].record: DIR)", str(directory))
    found: list[Recording] = []
    first: dict = {}
    for path in metas:
        meta = json.loads(path.read_text())
        if meta.get("format") != RECORD_FORMAT:
            raise ConfigError(f"recording format {meta.get('format')!r}, expected {RECORD_FORMAT}", str(path))
        first = first or meta
        if meta["topology_hash"] != first["topology_hash"]:
            raise ConfigError("recordings of different topologies in one directory", str(path))
        for key, name in meta["files"].items():
            edge, direction = key.split("|")
            with np.load(path.parent / name, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            found.append(Recording(meta["node"], meta["party"], edge, direction, arrays))
    return found, first


def _labels(topology, task, samples: np.ndarray) -> np.ndarray:
    spec = topology.data[task.labels]
    y = np.asarray(load_source(spec, topology.base_dir).labels).reshape(-1)
    aligned = aligned_rows(topology, topology.placement[task.labels][0], task.labels)
    return y[samples if aligned is None else aligned[samples]]


def _phases(steps: list, epochs: list[int]) -> dict:
    phases = {f"steps {a}-{b}": [s for s in steps if a <= s.step <= b] for a, b in PHASES_FIRST}
    for epoch in epochs:
        phases[f"epoch {epoch}"] = [s for s in steps if s.epoch == epoch]
    if epochs:
        phases["last epoch"] = [s for s in steps if s.epoch == epochs[-1]]
    phases["all steps"] = steps
    return {name: phase_figures(chosen) for name, chosen in phases.items() if chosen}


def attack_recording(topology, recording: Recording, task) -> dict:
    """Per-step attacks on one gradient recording, and their per-phase figures."""
    a = recording.arrays
    train = np.concatenate(sample_pools(topology).train)
    keep = np.isin(a["sample"], train)
    y = _labels(topology, task, a["sample"])
    train_y = _labels(topology, task, np.sort(train))
    minority = int(np.argmin(np.bincount(train_y.astype(np.int64), minlength=2)[:2]))
    prior = float(np.mean(train_y == minority))
    steps = []
    for step in np.unique(a["step"][keep]):
        at = keep & (a["step"] == step) & (a["lane"] == a["lane"][keep].min())
        if at.sum() >= 4:
            steps.append(attack_step(a["rows"][at], y[at] == minority, prior, int(step), int(a["epoch"][at][0])))
    epochs = sorted({s.epoch for s in steps})
    return {"node": recording.node, "party": recording.party, "task": task.name,
            "label_party": topology.party_of(task.labels), "prior": prior, "positive_class": minority,
            "rows": int(keep.sum()), "held_out_rows_dropped": int((~keep).sum()),
            "phases": _phases(steps, epochs), "per_step": [s.__dict__ for s in steps]}


def audit_run(topology, directory: Path) -> dict:
    """Trajectory attacks on every gradient recording under `directory` whose edge carries another party's
    binary labels."""
    recordings, meta = load_recordings(directory)
    if meta["topology_hash"] != topology.hash:
        raise ConfigError(f"the recordings are of topology {meta['topology']!r} ({meta['topology_hash']}), "
                          f"not of this one ({topology.hash})", str(directory))
    edges: dict[str, dict] = {}
    for recording in recordings:
        if recording.direction != "gradient":
            continue
        producer, consumer = recording.edge.split("->")
        for task in label_tasks(topology, producer, consumer):
            if topology.num_classes.get(task.labels) == 2:
                entry = edges.setdefault(recording.edge, {"defence": _defence(topology, producer), "tasks": {}})
                entry["tasks"][task.name] = attack_recording(topology, recording, task)
    return {"topology": topology.spec.name, "run": str(directory), "assumptions": ASSUMPTIONS,
            "label_edges": edges}


def _defence(topology, producer: str) -> Optional[dict]:
    entry = next((p for p in topology.spec.privacy if p.segment == producer), None)
    return None if entry is None or entry.gradient is None else entry.gradient.model_dump(exclude_none=True)


def recording_copy(topology, directory: Path):
    """The topology (quiet: no metrics ports, no checkpoints) with every cut segment recorded into `directory`."""
    quiet = quiet_copy(topology)
    spec = quiet.spec
    privacy = list(spec.privacy)
    cut = {p for p, _ in topology.cut_edges()}
    named = {p.segment for p in privacy}
    privacy = [p.model_copy(update={"record": str(directory)}) if p.segment in cut else p for p in privacy]
    entry_type = type(spec).model_fields["privacy"].annotation.__args__[0]
    privacy += [entry_type(segment=s, record=str(directory)) for s in sorted(cut - named)]
    copy = spec.model_copy(update={"privacy": privacy})
    return topology_from_spec(copy, topology.source, topology.base_dir)


def record_and_audit(topology, directory: Path, steps: Optional[int] = None) -> tuple[dict, dict]:
    """Train in-process recording every cut edge into `directory`, then attack the recordings."""
    recorded = recording_copy(topology, Path(directory).resolve())
    summary, _ = asyncio.run(simulate(recorded, RunOptions(steps=steps)))
    return audit_run(recorded, directory), summary
