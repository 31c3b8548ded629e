"""Atomic per-node checkpoints of segment weights and optimizer state at committed step boundaries.

Layout: <directory>/<node>/step-<k>.pt (torch.save of plain tensors/numbers; loaded with
weights_only=True). A checkpoint is written to a temporary file, fsynced and renamed, so a node
killed while writing leaves the previous checkpoint intact; the newest few are kept so that all
nodes can agree on a step every one of them has."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Optional

import torch

from meshsl.errors import CheckpointError

log = logging.getLogger("meshsl.compute.checkpoint")

KEEP = 4
STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
# Parts of a topology that do not change what a checkpoint holds (where nodes run, how long to wait).
_NOT_IN_MODEL = ("retry", "checkpoint", "security", "description")


def model_hash(topology) -> str:
    """Identifies what a checkpoint holds: the topology without endpoints, timeouts and checkpoint
    settings (a run resumed with other ports or timeouts still fits; another model does not)."""
    document = topology.spec.model_dump(mode="json")
    for key in _NOT_IN_MODEL:
        document.pop(key, None)
    for node in document.get("nodes", []):
        for key in ("endpoint", "standby", "metrics_port", "public_key", "threads", "device"):
            node.pop(key, None)
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]


def node_dir(directory: Path, node: str) -> Path:
    return Path(directory) / node


def available_steps(directory: Path, node: str) -> list[int]:
    folder = node_dir(directory, node)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for f in folder.iterdir() if (m := STEP_FILE.match(f.name)))


def save(directory: Path, node: str, step: int, state: dict, model: Optional[str] = None, keep: int = KEEP) -> Path:
    """`model`: `model_hash(topology)`, stored so that a checkpoint of another topology is refused clearly.
    `keep`: how many of the newest to keep (more under training.staleness: nodes may be further apart)."""
    if model is not None:
        state = {**state, "model_hash": model}
    folder = node_dir(directory, node)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step-{step}.pt"
    fd, tmp = tempfile.mkstemp(prefix=f".step-{step}-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive a crash
        finally:
            os.close(dir_fd)
    except RuntimeError as exc:  # torch's zip writer reports a short write as RuntimeError, not OSError
        written = Path(tmp).stat().st_size if Path(tmp).exists() else 0
        Path(tmp).unlink(missing_ok=True)
        if _disk_full(folder, written):
            raise OSError(errno.ENOSPC, f"No space left on device writing {target} ({exc})") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in available_steps(directory, node)[:-keep]:
        (folder / f"step-{old}.pt").unlink(missing_ok=True)
    return target


def _disk_full(folder: Path, written: int) -> bool:
    """Was the space left (now that the partial file is gone) about what the failed write had taken?"""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize <= written + (1 << 20)


def load(directory: Path, node: str, step: int, model: Optional[str] = None) -> dict:
    path = node_dir(directory, node) / f"step-{step}.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"node {node!r} has no checkpoint of step {step} in {path.parent}") from None
    except Exception as exc:  # truncated or foreign file
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from None
    stored = state.get("model_hash") if isinstance(state, dict) else None
    if model is not None and stored is not None and stored != model:
        raise CheckpointError(f"checkpoint {path} belongs to another topology (model {stored}, this topology's "
                              f"model is {model}): resume from this topology's own checkpoint directory, or "
                              f"start afresh without --resume")
    return state


def load_newest(directory: Path, node: str, model: Optional[str] = None) -> tuple[int, dict]:
    """The newest readable checkpoint of `node`. A newer one that cannot be read (truncated by a full
    disk, damaged) is set aside as step-K.pt.corrupt, so that the node no longer offers that step and
    the coordinator falls back to an older step that every node has. A checkpoint of another
    topology is an error, not a fallback."""
    for step in reversed(available_steps(directory, node)):
        try:
            return step, load(directory, node, step, model)
        except CheckpointError as exc:
            if "another topology" in str(exc):
                raise
            path = node_dir(directory, node) / f"step-{step}.pt"
            os.replace(path, path.with_name(path.name + ".corrupt"))
            log.warning("%s: %s; set aside, falling back to an older checkpoint", node, exc)
    raise CheckpointError(f"node {node!r} has no readable checkpoint in {node_dir(directory, node)}")


def read_counter(directory: Path, name: str) -> int:
    path = Path(directory) / f"{name}.counter"
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return 0


def write_counter(directory: Path, name: str, value: int) -> None:
    path = Path(directory) / f"{name}.counter"
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(value))
        os.replace(tmp, path)
    except OSError as exc:  # a full or read-only disk: a typed, loud failure instead of a traceback
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from None
