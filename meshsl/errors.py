"""One exception hierarchy for meshsl, each class named for the condition it reports.

User mistakes (bad YAML, wrong CLI arguments) raise ConfigError subclasses, which the CLI prints
as `error: ...` lines without a traceback. Faults caused by peers raise ProtocolError or
TransportError subclasses, which a node counts and survives.
"""
from __future__ import annotations


class MeshslError(Exception):
    """Base of every error meshsl raises on purpose."""


class ConfigError(MeshslError, ValueError):
    """The topology or a command-line argument is wrong; `where` names the file and key path."""

    def __init__(self, message: str, where: str = "") -> None:
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class TopologyError(ConfigError):
    """The topology is well-formed YAML but describes an impossible or unsafe training graph."""


class DataError(ConfigError):
    """A dataset cannot be loaded, partitioned or aligned as declared."""


class ProtocolError(MeshslError):
    """A peer sent a message that does not match the wire format or the plan.

    `reason` is a short, bounded label (used as a Prometheus label value)."""

    def __init__(self, reason: str, detail: str = "", peer: str = "") -> None:
        self.reason = reason
        self.detail = detail
        self.peer = peer
        text = f"{reason}: {detail}" if detail else reason
        super().__init__(f"from {peer!r}: {text}" if peer else text)


class TransportError(MeshslError, IOError):
    """Sending or receiving on the network failed."""


class PeerTimeout(TransportError, TimeoutError):
    """A peer did not answer within the policy's timeout."""

    def __init__(self, peer: str, waited_s: float, what: str = "answer") -> None:
        self.peer = peer
        self.waited_s = waited_s
        super().__init__(f"node {peer!r} did not {what} within {waited_s:.1f}s")


class PeerFailed(TransportError):
    """A peer was declared failed and could not be recovered (no standby, restart budget spent)."""

    def __init__(self, peer: str, detail: str = "") -> None:
        self.peer = peer
        super().__init__(f"node {peer!r} failed and could not be recovered" + (f": {detail}" if detail else ""))


class RunAborted(MeshslError):
    """The run was aborted on an error; every party stopped without final weights. `peer` names the
    party that reported the cause (the coordinator, or the node that gave up on it)."""

    def __init__(self, peer: str, reason: str) -> None:
        self.peer = peer
        self.reason = reason
        super().__init__(f"run aborted ({peer}): {reason}")


class CheckpointError(MeshslError):
    """A checkpoint is missing, incomplete or inconsistent across nodes."""


class AuthError(MeshslError):
    """Keys are missing or a peer failed authentication."""
