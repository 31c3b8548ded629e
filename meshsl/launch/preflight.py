"""Checks made before any node process starts, for failures that a restart would only repeat: a CUDA
device this machine does not have, a port already in use, a directory that cannot be written.

Each finding is a PreflightError naming the node (or option) and the key path; `preflight` raises them
together (ConfigErrors), so `meshsl run`, `meshsl node` and `meshsl.run()` stop in a second instead of
restarting a node until the restart budget is spent."""
from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Iterable, Optional

from meshsl.errors import ConfigError, ConfigErrors, PreflightError


def _where(topology, declared: str, key: str) -> str:
    """'T.yaml: nodes[2](lab).device' for a declared node name."""
    names = [n.name for n in topology.spec.nodes]
    entry = f"nodes[{names.index(declared)}]({declared})" if declared in names else f"nodes({declared})"
    return f"{topology.source}: {entry}.{key}"


def _declared_name(topology, node: str) -> str:
    """A replicated client's copy (clinic-3) -> the declared node (clinic); others unchanged."""
    declared = {n.name for n in topology.spec.nodes}
    if node in declared:
        return node
    return next((name for name, copies in _copies(topology).items() if node in copies), node)


def _copies(topology) -> dict[str, set[str]]:
    replicated = set(topology.spec.clients.replicate) if topology.spec.clients else set()
    found: dict[str, set[str]] = {name: set() for name in replicated}
    for items in (topology.spec.data, topology.spec.segments):
        for item in items:
            if item.node in replicated:
                found[item.node].update(topology.placement[item.name])
    return found


def cuda_devices() -> int:
    """CUDA devices this machine's torch can use (0 on a CPU-only build)."""
    import torch  # the device check needs the installed torch build
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_devices(topology, nodes: Iterable[str], available: Optional[int] = None) -> list[ConfigError]:
    """Every `cuda[:i]` device of `nodes` exists here."""
    problems: list[ConfigError] = []
    needs = {name: topology.nodes[name].device for name in nodes if topology.nodes[name].device.startswith("cuda")}
    if not needs:
        return problems
    count = cuda_devices() if available is None else available
    seen: set[str] = set()
    for name, device in needs.items():
        declared = _declared_name(topology, name)
        index = int(device.partition(":")[2] or 0)
        if index < count or declared in seen:
            continue
        seen.add(declared)
        have = "no CUDA device (a CPU-only torch, or no GPU visible)" if count == 0 else f"{count} CUDA device(s)"
        problems.append(PreflightError(
            f"node {declared!r} asks for device {device!r}, but this machine has {have}; use `device: cpu` "
            f"(or `--device cpu`), or install a CUDA build of torch", _where(topology, declared, "device")))
    return problems


def _port_in_use(host: str, port: int) -> bool:
    host = "0.0.0.0" if host in ("*", "") else host
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As ZeroMQ and the metrics server bind: a port left in TIME_WAIT by a previous process is free,
        # one another socket listens on is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno in (errno.EADDRINUSE, errno.EACCES)  # another host's address: not ours to judge
    return False


def check_ports(topology, nodes: Iterable[str], hint: str = "`meshsl run --free-ports`") -> list[ConfigError]:
    """The tcp endpoint and metrics port of every node in `nodes` can be bound on this machine."""
    problems: list[ConfigError] = []
    metrics_host = topology.spec.security.metrics_bind
    for name in nodes:
        spec = topology.nodes[name]
        wanted = []
        if spec.endpoint and spec.endpoint.startswith("tcp://"):
            host, _, port = spec.endpoint[len("tcp://"):].rpartition(":")
            wanted.append(("endpoint", host, int(port), spec.endpoint))
        if spec.metrics_port:
            wanted.append(("metrics_port", metrics_host, spec.metrics_port, f"{metrics_host}:{spec.metrics_port}"))
        for key, host, port, text in wanted:
            try:
                busy = _port_in_use(host, port)
            except (OSError, socket.gaierror):
                busy = False  # an address of another machine: the node binds it there
            if busy:
                problems.append(PreflightError(
                    f"node {name!r}: port {port} ({text}) is already in use on this machine (another run still "
                    f"going, or another program); pick free loopback ports with {hint}, or change the {key}",
                    _where(topology, _declared_name(topology, name), key)))
    return problems


def check_writable(paths: dict[str, Optional[Path]]) -> list[ConfigError]:
    """Each directory (label -> path) exists and is writable, or can be created."""
    problems: list[ConfigError] = []
    for label, path in paths.items():
        if path is None:
            continue
        path = Path(path).absolute()
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            why = f"{existing} is a file, not a directory"
        elif not os.access(existing, os.W_OK | os.X_OK):
            why = f"{existing} is not writable by this user"
        else:
            continue
        problems.append(PreflightError(f"cannot write {path}: {why}", label))
    return problems


def preflight(topology, nodes: Optional[Iterable[str]] = None, *, ports: bool = True,
              directories: Optional[dict[str, Optional[Path]]] = None,
              port_hint: str = "`meshsl run --free-ports`") -> None:
    """Every check for the nodes started on this machine (default: all of them); raises the PreflightError
    found, or ConfigErrors holding each of several."""
    local = list(topology.nodes if nodes is None else nodes)
    problems = check_devices(topology, local)
    if ports:
        problems += check_ports(topology, local, port_hint)
    problems += check_writable(directories or {})
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ConfigErrors(problems)
