"""Round policies for many clients, free of I/O: the coordinator asks them, they never send anything.

- `FedAvg` / `aggregate()`: SplitFed averaging of client segment weights, weighted by sample counts,
  over whichever clients take part (the survivors, after a drop).
- `ClientRoster`: which clients take part (`clients.on_loss: drop`): dropping lost clients (with the
  `min_clients` floor), noting their return, readmitting them at a barrier, the sequential hand-off
  order that skips dropped clients. Every change is recorded with the step it takes effect at, so a
  run can be replayed with the same changes at the same steps (docs/failover.md, "Clients that drop
  out").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence

from meshsl.errors import PeerFailed

if TYPE_CHECKING:  # FedAvg only calls tensor methods: the roster and its machine import without torch
    import torch


# ---- SplitFed averaging ----------------------------------------------------------------------
class FedAvg:
    """Sample-weighted average of client weights, accumulated client by client (so a coordinator of many
    clients holds one running sum, not every client's weights). Summed in float64 in the order clients
    are added, then cast back: the same order gives bit-identical results."""

    def __init__(self, sample_counts: Mapping[int, int]) -> None:
        self.total = sum(sample_counts.values())
        if self.total <= 0:
            raise ValueError("FedAvg needs at least one client with samples")
        self.counts = dict(sample_counts)
        self._sum: Optional[list[torch.Tensor]] = None
        self._dtypes: list[torch.dtype] = []

    def add(self, client: int, weights: Sequence[torch.Tensor]) -> None:
        share = self.counts[client] / self.total
        scaled = [w.double() * share for w in weights]
        if self._sum is None:
            self._sum, self._dtypes = scaled, [w.dtype for w in weights]
        else:
            self._sum = [a + s for a, s in zip(self._sum, scaled)]

    def result(self) -> list[torch.Tensor]:
        if self._sum is None:
            raise ValueError("FedAvg of no client")
        return [a.to(dtype) for a, dtype in zip(self._sum, self._dtypes)]


def aggregate(weights_by_client: Mapping[int, Sequence[torch.Tensor]],
              sample_counts: Mapping[int, int]) -> list[torch.Tensor]:
    """FedAvg over the clients in `weights_by_client` (in client order), weighted by their sample counts."""
    average = FedAvg({c: sample_counts[c] for c in weights_by_client})
    for client in sorted(weights_by_client):
        average.add(client, weights_by_client[client])
    return average.result()


# ---- who takes part ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientChange:
    """A client leaving (`drop`) or rejoining (`rejoin`) the run, effective from training step `step`."""
    event: str
    nodes: tuple[str, ...]
    lanes: tuple[int, ...]
    step: int
    cause: str

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.event, "nodes": list(self.nodes), "lanes": list(self.lanes), "step": self.step,
                "cause": self.cause}


class ClientRoster:
    """The clients (lanes) taking part in training, and the nodes that serve them.

    A lane is one client; its nodes are the copies of `clients.replicate` for that lane. A lost client
    node drops its whole lane (every node of it). Rules (docs/failover.md):
    - a drop takes effect at the step the survivors resume from (the newest checkpoint they share);
    - a dropped client that announced itself again is readmitted at the next weight barrier (FedAvg,
      sequential turn end), from the next step on, with the global client weights and a fresh optimizer;
    - below `min_clients` lanes the run fails (PeerFailed naming the floor)."""

    def __init__(self, nodes_of_lane: Mapping[int, Iterable[str]], on_loss: str = "wait",
                 min_clients: int = 1) -> None:
        self.nodes_of_lane = {lane: tuple(nodes) for lane, nodes in nodes_of_lane.items()}
        self.lane_of_node = {node: lane for lane, nodes in self.nodes_of_lane.items() for node in nodes}
        self.on_loss = on_loss
        self.min_clients = min_clients
        self.dropped: dict[int, int] = {}  # lane -> step its drop took effect
        self.returned: set[str] = set()  # nodes of dropped lanes that announced themselves again
        self.changes: list[ClientChange] = []

    @classmethod
    def from_topology(cls, topology: Any) -> "ClientRoster":
        clients = topology.spec.clients
        nodes_of_lane: dict[int, list[str]] = {}
        if clients is not None and topology.lanes > 1:
            for name in [*topology.segment_order, *topology.data]:
                if topology.is_replicated(name):
                    for lane, node in enumerate(topology.placement[name]):
                        if node not in nodes_of_lane.setdefault(lane, []):
                            nodes_of_lane[lane].append(node)
        return cls(nodes_of_lane, clients.on_loss if clients else "wait",
                   (clients.min_clients or 1) if clients else 1)

    # -- questions ---------------------------------------------------------------------------------
    def can_drop(self, nodes: Iterable[str]) -> bool:
        """`on_loss: drop` and every lost node serves a client (a shared node, e.g. the server, never drops)."""
        nodes = set(nodes)
        return self.on_loss == "drop" and bool(nodes) and nodes <= self.lane_of_node.keys()

    def active_lanes(self, lanes: Iterable[int]) -> tuple[int, ...]:
        return tuple(lane for lane in lanes if lane not in self.dropped)

    def dropped_lanes(self) -> tuple[int, ...]:
        return tuple(sorted(self.dropped))

    def dropped_nodes(self) -> set[str]:
        return {node for lane in self.dropped for node in self.nodes_of_lane[lane]}

    def active_nodes(self, nodes: Iterable[str]) -> list[str]:
        """`nodes` (in their order) without the nodes of dropped clients."""
        out = self.dropped_nodes()
        return [n for n in nodes if n not in out]

    def survivors_after(self, nodes: Iterable[str], all_nodes: Iterable[str]) -> list[str]:
        """The nodes that would take part once the clients of `nodes` are dropped."""
        lanes = {self.lane_of_node[n] for n in nodes}
        gone = self.dropped_nodes() | {n for lane in lanes for n in self.nodes_of_lane[lane]}
        return [n for n in all_nodes if n not in gone]

    # -- changes -----------------------------------------------------------------------------------
    def drop(self, nodes: Iterable[str], step: int, cause: str) -> Optional[ClientChange]:
        """Drop the clients of the lost `nodes` from training step `step` on. Raises PeerFailed below the
        `min_clients` floor. A lane dropped already (it was lost again before being readmitted) only
        forgets that it had come back: None."""
        nodes = sorted(set(nodes))
        lanes = sorted({self.lane_of_node[n] for n in nodes})
        fresh = [lane for lane in lanes if lane not in self.dropped]
        self.returned -= set(nodes)
        if not fresh:
            return None
        left = len(self.nodes_of_lane) - len(self.dropped) - len(fresh)
        if left < self.min_clients:
            raise PeerFailed(nodes[0], f"lost client node(s) {', '.join(nodes)} at step {step}: {left} of "
                                       f"{len(self.nodes_of_lane)} clients left, below clients.min_clients = "
                                       f"{self.min_clients}; the run cannot go on")
        for lane in fresh:
            self.dropped[lane] = step
            # The lane's other nodes are alive: they take part again with it, no announcement needed.
            self.returned |= set(self.nodes_of_lane[lane]) - set(nodes)
        change = ClientChange("drop", tuple(n for lane in fresh for n in self.nodes_of_lane[lane]),
                              tuple(fresh), step, cause)
        self.changes.append(change)
        return change

    def note_return(self, node: str) -> bool:
        """A node of a dropped client announced itself (a new process, or the old one back): True."""
        lane = self.lane_of_node.get(node)
        if lane is None or lane not in self.dropped:
            return False
        self.returned.add(node)
        return True

    def ready_to_rejoin(self) -> tuple[int, ...]:
        """Dropped lanes every node of which has announced itself again."""
        return tuple(lane for lane in sorted(self.dropped)
                     if all(n in self.returned for n in self.nodes_of_lane[lane]))

    def readmit(self, lanes: Iterable[int], step: int, cause: str = "rejoined") -> Optional[ClientChange]:
        lanes = sorted(lane for lane in set(lanes) if lane in self.dropped)
        if not lanes:
            return None
        for lane in lanes:
            del self.dropped[lane]
            self.returned -= set(self.nodes_of_lane[lane])
        change = ClientChange("rejoin", tuple(n for lane in lanes for n in self.nodes_of_lane[lane]),
                              tuple(lanes), step, cause)
        self.changes.append(change)
        return change

    def rewind(self, step: int) -> list[int]:
        """A restore to checkpoint `step`: readmissions after it are undone (their lanes wait for the next
        barrier again, as they did then). Returns those lanes."""
        undone = []
        for change in [c for c in self.changes if c.event == "rejoin" and c.step > step]:
            self.changes.remove(change)
            for lane in change.lanes:
                self.dropped[lane] = step
                self.returned |= set(self.nodes_of_lane[lane])
                undone.append(lane)
        return undone

    # -- sequential split learning -----------------------------------------------------------------
    def next_active(self, step_lanes: Sequence[tuple[int, ...]], index: int,
                    rejoining: Iterable[int] = ()) -> Optional[int]:
        """The first step from `index` that a client still taking part (or one `rejoining` now) trains:
        the hand-off skips dropped clients. None when none is left."""
        rejoining = set(rejoining)
        for i in range(index, len(step_lanes)):
            if any(lane not in self.dropped or lane in rejoining for lane in step_lanes[i]):
                return i
        return None

    def hand_off_source(self, step_lanes: Sequence[tuple[int, ...]], index: int) -> Optional[int]:
        """The client whose weights a turn beginning at step `index` after skipped steps starts from: the
        last client still taking part that trained before it (a dropped client's unfinished turn is lost
        with it). None at the very start."""
        for i in range(index - 1, -1, -1):
            active = self.active_lanes(step_lanes[i])
            if active:
                return active[0]
        return None


def planned_changes(schedule: Optional[Iterable[Mapping[str, Any]]]) -> Optional[dict[str, Any]]:
    """A run's recorded `client_events` as {"drop" | "rejoin": {step: [nodes, ...]}}, to replay them at the
    same steps (RunOptions.client_schedule). None: nothing to replay."""
    if schedule is None:
        return None
    planned: dict[str, Any] = {"drop": {}, "rejoin": {}}
    for event in schedule:
        planned[event["event"]].setdefault(int(event["step"]), []).append(tuple(event["nodes"]))
    return planned


__all__ = ["ClientChange", "ClientRoster", "FedAvg", "aggregate", "planned_changes"]
