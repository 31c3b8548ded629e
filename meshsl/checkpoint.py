"""Atomic per-node checkpoints of segment weights and optimizer state at committed step boundaries.

Layout: <directory>/<node>/step-<k>.pt (torch.save of plain tensors/numbers; loaded with
weights_only=True). A checkpoint is written to a temporary file, fsynced and renamed, so a node
killed while writing leaves the previous checkpoint intact; the newest few are kept so that all
nodes can agree on a step every one of them has."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from meshsl.errors import CheckpointError

KEEP = 4
STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def node_dir(directory: Path, node: str) -> Path:
    return Path(directory) / node


def available_steps(directory: Path, node: str) -> list[int]:
    folder = node_dir(directory, node)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for f in folder.iterdir() if (m := STEP_FILE.match(f.name)))


def save(directory: Path, node: str, step: int, state: dict) -> Path:
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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in available_steps(directory, node)[:-KEEP]:
        (folder / f"step-{old}.pt").unlink(missing_ok=True)
    return target


def load(directory: Path, node: str, step: int) -> dict:
    path = node_dir(directory, node) / f"step-{step}.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"node {node!r} has no checkpoint of step {step} in {path.parent}") from None
    except Exception as exc:  # truncated or foreign file
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from None


def read_counter(directory: Path, name: str) -> int:
    path = Path(directory) / f"{name}.counter"
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return 0


def write_counter(directory: Path, name: str, value: int) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    path = Path(directory) / f"{name}.counter"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(value))
    os.replace(tmp, path)
