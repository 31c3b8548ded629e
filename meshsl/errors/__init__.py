"""One exception hierarchy for meshsl, each class named for the condition it reports.

User mistakes (bad YAML, wrong CLI arguments) raise ConfigError subclasses, which the CLI prints
as `error: ...` lines without a traceback. Faults caused by peers raise ProtocolError or
TransportError subclasses, which a node counts and survives.

Every error crosses a process boundary intact: pickled (its fields kept, whatever its __init__ takes)
or as plain data (`as_data` / `from_data`, JSON-safe), e.g. in a node's summary file.
"""
from __future__ import annotations

import time
from typing import Any, Optional


def _rebuild(cls: type, args: tuple, state: dict) -> "MeshslError":
    error = cls.__new__(cls, *args)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


def _plain(value: Any) -> Any:
    if isinstance(value, MeshslError):
        return value.as_data()
    if isinstance(value, (set, frozenset)):
        return [_plain(v) for v in sorted(value, key=str)]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if value is None or isinstance(value, (str, int, float, bool)) else repr(value)


class MeshslError(Exception):
    """Base of every error meshsl raises on purpose."""

    def __reduce__(self):
        # The default pickles `args` only and calls __init__(*args) again, which fails for classes whose
        # __init__ takes fields (PeerTimeout(peer, waited_s)) and drops the fields of the others.
        return _rebuild, (type(self), self.args, dict(self.__dict__))

    def as_data(self) -> dict:
        """{"type", "message", "fields"}: JSON-safe (nested errors become data too)."""
        return {"type": type(self).__name__, "message": str(self),
                "fields": {k: _plain(v) for k, v in self.__dict__.items() if not k.startswith("_")}}

    @staticmethod
    def from_data(data: dict) -> "MeshslError":
        """The error `as_data` described: its class when it is one of this module's, MeshslError otherwise."""
        cls = _CLASSES.get(str(data.get("type")), MeshslError)
        fields = {k: (MeshslError.from_data(v) if isinstance(v, dict) and "type" in v and "message" in v else
                      [MeshslError.from_data(i) if isinstance(i, dict) and "type" in i else i for i in v]
                      if isinstance(v, list) else v)
                  for k, v in (data.get("fields") or {}).items()}
        return _rebuild(cls, (str(data.get("message", "")),), fields)


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


class NodesLost(MeshslError):
    """Nodes stopped answering (heartbeat timeout) or timed out mid-round; recovery may bring them back."""

    def __init__(self, nodes: set[str], why: str, cause: str = "timeout", rejoined: Optional[dict] = None) -> None:
        self.nodes = set(nodes)
        self.why = why
        self.cause = cause  # timeout | heartbeat | restarted | exited (a bounded label: metrics and the summary)
        self.rejoined = dict(rejoined or {})  # node -> the HELLO meta its new process already sent
        self.detected = time.time()
        super().__init__(f"lost node(s) {', '.join(sorted(nodes))}: {why}")


class CheckpointError(MeshslError):
    """A checkpoint is missing, incomplete or inconsistent across nodes."""


class AuthError(MeshslError):
    """Keys are missing or a peer failed authentication."""


class ConfigErrors(ConfigError):
    """Several problems found at once; `problems` holds one ConfigError each."""

    def __init__(self, problems: list[ConfigError]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class AlignmentError(DataError):
    """The parties' sample ids cannot be aligned: no common sample, fewer than the declared minimum,
    or a peer did not take part in time."""


class PreflightError(ConfigError):
    """This machine cannot run the node as declared (a missing CUDA device, a port in use, a directory that
    cannot be written): found before any process starts, since a restart would fail the same way."""


class RunCancelled(MeshslError):
    """The run was stopped on request (`Run.cancel()`, a progress callback returning False); every node
    process was stopped. `step`: the last committed step seen (-1: none)."""

    def __init__(self, step: int, run_dir: str = "") -> None:
        self.step = step
        self.run_dir = run_dir
        super().__init__(f"run cancelled after step {step}" if step >= 0 else "run cancelled before its first step")


class PrivacyBudgetError(ConfigError):
    """A run would spend more privacy budget (epsilon) than the topology declares."""


class PartyOffline(PeerTimeout):
    """A party needed for prediction (or evaluation) did not come online in time."""

    def __init__(self, peer: str, waited_s: float, parties: str = "") -> None:
        super().__init__(peer, waited_s, "start")
        self.args = (f"node(s) {peer} {('(' + parties + ') ') if parties else ''}did not come online within "
                     f"{waited_s:.1f}s; every party holding inputs or segments must run its node "
                     f"(`meshsl node NAME --predict ...`)",)

    def __str__(self) -> str:
        return self.args[0]



class KitTampered(AuthError):
    """A provisioned start-up kit does not match the manifest its project signed (a file changed, added or
    removed, or the signature is not the project's)."""


class SignatureInvalid(AuthError):
    """A signed document (a job, a site's hello) carries no signature, or one that its signer's key does not
    verify."""


class JobRefused(MeshslError):
    """A submitted job was refused: by the broker (unsigned, unknown submitter, malformed) or by a site's
    policy. `reasons` maps who refused (a site, or "broker") to why."""

    def __init__(self, job: str, reasons: dict[str, str]) -> None:
        self.job = job
        self.reasons = dict(reasons)
        text = "; ".join(f"{who}: {why}" for who, why in sorted(self.reasons.items()))
        super().__init__(f"job {job} refused: {text}")


class JobFailed(MeshslError):
    """A job ended without a trained model on every site: a node failed, it was aborted, or it ran past a
    site's time limit. `state` is the job's final state and `reasons` maps site to cause."""

    def __init__(self, job: str, state: str, reasons: dict[str, str]) -> None:
        self.job = job
        self.state = state
        self.reasons = dict(reasons)
        text = "; ".join(f"{who}: {why}" for who, why in sorted(self.reasons.items()))
        super().__init__(f"job {job} {state}" + (f": {text}" if text else ""))


# Every error class of this module by name (MeshslError.from_data).
_CLASSES = {name: cls for name, cls in list(globals().items())
            if isinstance(cls, type) and issubclass(cls, MeshslError)}
