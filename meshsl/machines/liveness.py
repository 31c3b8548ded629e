"""A node's view of the coordinator's liveness, free of I/O: events in (time only through them), decisions out.

It holds what decides whether this node announces itself, sends heartbeats, or gives up on a run:
acknowledged by the coordinator (now, ever), when it was last heard, which process of the coordinator's
node it last heard, and whether a clean shutdown was asked for. The node's shell sends and sleeps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union


# -- events ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Started:
    """Our own start-up (torch, data) is done: it was no silence of the coordinator's."""
    now: float


@dataclass(frozen=True)
class CoordinatorHeard:
    now: float


@dataclass(frozen=True)
class HelloAcked:
    pass


@dataclass(frozen=True)
class IncarnationHeard:
    """A coordinator heartbeat naming its process (a standby that took over names a new one)."""
    token: object


@dataclass(frozen=True)
class Tick:
    """The heartbeat interval passed."""
    now: float


@dataclass(frozen=True)
class HelloUnanswered:
    """An announcement went unacknowledged; `since`: when announcing began, `refused`: how many CURVE
    handshakes the coordinator refused."""
    now: float
    since: float
    refused: int


Event = Union[Started, CoordinatorHeard, HelloAcked, IncarnationHeard, Tick, HelloUnanswered]


# -- decisions -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SendHeartbeat:
    peer: str


@dataclass(frozen=True)
class Announce:
    """Say hello again (the coordinator restarted, or went silent and may have a successor)."""
    reason: str


@dataclass(frozen=True)
class PeerDown:
    peer: str


@dataclass(frozen=True)
class GiveUp:
    """Stop the node; `aborted`: the run is lost (exit non-zero)."""
    reason: str
    aborted: bool = True


Decision = Union[SendHeartbeat, Announce, PeerDown, GiveUp]


def coordinator_silence_limit(policy: Any) -> float:
    """How long a node waits for a silent coordinator (it may be restarted meanwhile) before giving up."""
    declared = getattr(policy, "coordinator_timeout_s", None)
    return float(declared if declared else policy.heartbeat_timeout_s + policy.startup_timeout_s)


class Liveness:
    """`hosts_coordinator`: this node runs the coordinator, so it heartbeats every peer and watches no one
    (the launcher watches it)."""

    def __init__(self, node: str, coordinator: str, peers: Iterable[str], policy: Any, hosts_coordinator: bool,
                 now: float) -> None:
        self.node = node
        self.coordinator = coordinator
        self.peers = [p for p in peers if p != node]
        self.policy = policy
        self.hosts_coordinator = hosts_coordinator
        self.coordinator_seen = now
        self.contacted = False  # heard from the coordinator at least once
        self.hello_acked = False  # acknowledged by the coordinator's current process
        self.joined = False  # acknowledged at least once
        self.shutdown_requested = False
        self.coordinator_incarnation: Optional[str] = None
        self._last_heartbeat: dict[str, float] = {}

    def handle(self, event: Event) -> list[Decision]:
        if isinstance(event, Started):
            self.coordinator_seen = event.now
        elif isinstance(event, CoordinatorHeard):
            self.coordinator_seen = event.now
            self.contacted = True
        elif isinstance(event, HelloAcked):
            self.hello_acked = self.joined = True
        elif isinstance(event, IncarnationHeard):
            return self._incarnation(event.token)
        elif isinstance(event, Tick):
            return self._tick(event.now)
        elif isinstance(event, HelloUnanswered):
            return self._unanswered(event)
        else:
            raise TypeError(f"not a liveness event: {event!r}")
        return []

    def request_shutdown(self) -> None:
        self.shutdown_requested = True

    def finished(self, compute_idle: bool) -> bool:
        """A clean shutdown was asked for and nothing is left to compute (a commit's step must not be lost)."""
        return self.shutdown_requested and compute_idle

    def heartbeat_due(self, peer: str, now: float, last_sent: float) -> bool:
        """Any message proves liveness, so a peer sent something within the interval gets a heartbeat only
        every half timeout (a coordinator of 1,000 clients would otherwise send 1,000 every interval)."""
        if now - last_sent < self.policy.heartbeat_interval_s and \
                now - self._last_heartbeat.get(peer, 0.0) < self.policy.heartbeat_timeout_s / 2:
            return False
        self._last_heartbeat[peer] = now
        return True

    def _tick(self, now: float) -> list[Decision]:
        if self.hosts_coordinator:
            return [SendHeartbeat(peer) for peer in self.peers]
        actions: list[Decision] = [SendHeartbeat(self.coordinator)]
        silent = now - self.coordinator_seen
        limit = coordinator_silence_limit(self.policy)
        if self.joined and silent > limit:  # before joining, the announcer waits (longer: start-up)
            actions.append(GiveUp(
                f"coordinator {self.coordinator!r} silent for {silent:.1f}s, unreachable (network partition "
                f"or node down; limit {limit:.1f}s: retry.coordinator_timeout_s); giving up on the run"))
        elif self.hello_acked and silent > self.policy.heartbeat_timeout_s:
            self.hello_acked = False
            actions += [PeerDown(self.coordinator), Announce(f"silent for {silent:.1f}s")]
        return actions

    def _incarnation(self, token: object) -> list[Decision]:
        if self.hosts_coordinator or not isinstance(token, str) or len(token) > 64:
            return []
        previous, self.coordinator_incarnation = self.coordinator_incarnation, token
        if previous is not None and previous != token and self.hello_acked:
            self.hello_acked = False
            return [Announce("restarted")]
        return []

    def _unanswered(self, event: HelloUnanswered) -> list[Decision]:
        waited = event.now - event.since
        if event.refused and waited > self.policy.startup_timeout_s:
            return [GiveUp(f"node {self.node!r} could not join: {self.coordinator} refused its CURVE key "
                           f"{event.refused} times (check {self.node}.key_secret against the topology's keys)",
                           aborted=False)]
        # Before joining, the coordinator may still be starting (importing torch on a busy machine).
        limit = coordinator_silence_limit(self.policy) + (0 if self.joined else self.policy.startup_timeout_s)
        if waited <= limit:
            return []
        return [GiveUp(f"coordinator {self.coordinator!r} did not acknowledge node {self.node!r} within "
                       f"{waited:.1f}s (limit {limit:.1f}s from retry.heartbeat_timeout_s and startup_timeout_s); "
                       f"is it running?")]
