"""What the coordinator decides about incoming messages, free of I/O: events in, actions out.

The async Coordinator (coordinator/runtime.py) opens one wait at a time -- a round's messages
(`expect`), every node's HELLO at start-up (`expect_hellos`), every node's RESTORE acknowledgement
(`expect_restore_acks`) -- then feeds it the inbox as events and a `Tick(now)` before every wait, and
carries out the actions. The machine keeps liveness (who was heard when), what HELLOs announced
(process incarnations, checkpoints, endpoints, prediction inputs), the steps each node applied, and
DONEs of later self-driven steps that arrive before their collection. Time only comes in through
events: the machine never reads a clock.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

from meshsl.errors import MeshslError, PeerFailed, PeerTimeout, ProtocolError
from meshsl.machines.liveness import Tick
from meshsl.protocol import control
from meshsl.protocol.envelope import Kind

if TYPE_CHECKING:
    from meshsl.machines.policies import ClientRoster


# ---- events -------------------------------------------------------------------------------------
# The clock: `Tick(now)`, read by the driver before every wait (deadlines, retries and liveness are
# judged), the same event the node's liveness machine takes.


@dataclass(frozen=True)
class Received:
    """A message of the coordinator's inbox, parsed: `message` is its control.* object (Hello, Done, Ack,
    Failed, Weights). `envelope` and `tensors` travel only to hand a Weights reply's tensors back in
    Collected; the machine decides on `message` alone."""
    sender: str
    round: int
    phase: str
    message: control.ControlMessage
    now: float = 0.0
    known_endpoint: Optional[str] = None  # HELLO: where the host sends to `sender` now (its address book)
    envelope: Any = None
    tensors: Any = None

    @property
    def kind(self) -> Kind:
        return self.message.kind


@dataclass(frozen=True)
class Exited:
    """The launcher saw process `pid` of `sender` end (`meshsl node --exit-reports`): a lost node as an
    event. No heartbeat timeout, round timeout or replacement's hello is waited for; only that node is named."""
    sender: str
    pid: int


Event = Union[Tick, Received, Exited]


def event_of(sender: str, envelope: Any, tensors: Any, now: float, known_endpoint: Optional[str] = None) -> Received:
    """The event a message of the coordinator's inbox is (ProtocolError when it is malformed;
    `known_endpoint`: HELLO only, see Received)."""
    message = control.parse(envelope)
    if message is None:
        raise ProtocolError("unexpected", f"{envelope.kind.value} is not a message for the coordinator", sender)
    return Received(sender, envelope.step, envelope.phase, message, now, known_endpoint, envelope, tensors)


# ---- actions ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SendAck:
    node: str
    of: str = "hello"


@dataclass(frozen=True)
class Reroute:
    """`node` came back at another endpoint (a standby took over): send to it there."""
    node: str
    endpoint: str


@dataclass(frozen=True)
class SendRestore:
    nodes: tuple[str, ...]
    round: int
    message: control.Restore


@dataclass(frozen=True)
class ClientBack:
    """A dropped client announced itself again; it rejoins at the next barrier."""
    node: str


@dataclass(frozen=True)
class Extended:
    """Every awaited node is alive but slow: the wait gets one more timeout."""
    pending: tuple[str, ...]
    what: str


@dataclass(frozen=True)
class Collected:
    """The wait is over: {sender: Received} of every awaited node."""
    results: dict[str, Received]


@dataclass(frozen=True)
class Lost:
    """Nodes to recover (errors.NodesLost): silent, timed out, or restarted mid-round."""
    nodes: frozenset[str]
    why: str
    cause: str = "timeout"  # timeout | heartbeat | restarted | exited
    rejoined: dict[str, control.Hello] = field(default_factory=dict)  # node -> the control.Hello its new process sent


@dataclass(frozen=True)
class Fail:
    """The run cannot go on: the typed error to raise."""
    error: MeshslError


Action = Union[SendAck, Reroute, SendRestore, ClientBack, Extended, Collected, Lost, Fail]


# ---- liveness -----------------------------------------------------------------------------------
class SilenceWatch:
    """When each node was last heard from. `last_seen` is oldest first (heard_from moves a node to the
    end), so the lost-node check, done before every message collected, looks only at its head."""

    def __init__(self, heartbeat_timeout_s: float, now: float) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.last_seen: OrderedDict[str, float] = OrderedDict()
        self.heard: dict[str, float] = {}  # never reset (the true times, see silent)
        self.last_check = now

    def heard_from(self, node: str, now: float) -> None:
        self.last_seen[node] = self.heard[node] = now
        self.last_seen.move_to_end(node)

    def forget(self, node: str) -> None:
        self.last_seen.pop(node, None)

    def lost(self, now: float, candidates: frozenset[str], own: str) -> set[str]:
        """Candidates not heard from within the heartbeat timeout (never heard from: not lost)."""
        if now - self.last_check > self.heartbeat_timeout_s / 2:
            # We ourselves did not run (process paused, loop starved): the silence is ours, and the
            # peers' heartbeats may still sit unread in the socket. Start their clocks afresh (a busy
            # machine starves everyone alike: lenient here; `heard` keeps the true times, see silent).
            for name in self.last_seen:
                self.last_seen[name] = now
        self.last_check = now
        limit = now - self.heartbeat_timeout_s
        lost = set()
        for name, when in self.last_seen.items():
            if when >= limit:
                break  # every later entry was seen later still
            if name != own and name in candidates:
                lost.add(name)
        return lost

    def silent(self, nodes: Iterable[str], now: float, own: str) -> set[str]:
        """Those of `nodes` not heard from within the heartbeat timeout (never heard from: silent)."""
        limit = now - self.heartbeat_timeout_s
        return {n for n in nodes if n != own and self.heard.get(n, 0.0) < limit}


# ---- what the nodes announced -------------------------------------------------------------------
class HelloBook:
    """What HELLOs and DONEs told: process incarnations, checkpoint steps, endpoints, prediction inputs,
    and the last training round each node applied."""

    def __init__(self) -> None:
        self.incarnations: dict[str, str] = {}  # node -> the process token of its last HELLO
        self.checkpoints: dict[str, set[int]] = {}  # node -> checkpoint steps it reported
        self.endpoints: dict[str, str] = {}  # node -> endpoint it announced (standbys move nodes)
        self.predict_rows: dict[str, int] = {}  # node -> rows of its prediction input (predict runs)
        self.committed: dict[str, int] = {}  # node -> last round whose optimizer step it applied
        self.pids: dict[str, int] = {}  # node -> the process id its last HELLO named (exit reports name it)

    def note_hello(self, sender: str, hello: control.Hello,
                   known_endpoint: Optional[str]) -> tuple[bool, Optional[str]]:
        """(a new process of a node seen before, the endpoint to reroute to or None)."""
        restarted = False
        if hello.incarnation:
            previous = self.incarnations.get(sender)
            self.incarnations[sender] = hello.incarnation
            restarted = previous is not None and previous != hello.incarnation
        self.checkpoints[sender] = set(hello.checkpoints)
        reroute = None
        if hello.endpoint is not None:
            if hello.endpoint and hello.endpoint != known_endpoint:
                reroute = hello.endpoint  # it came back at a standby endpoint
            self.endpoints[sender] = hello.endpoint
        if hello.predict_rows is not None:
            self.predict_rows[sender] = hello.predict_rows  # how many rows its own prediction input has
        if hello.pid is not None:
            self.pids[sender] = hello.pid
        return restarted, reroute

    def note_checkpoint(self, sender: str, checkpoint: Optional[int]) -> None:
        if checkpoint is not None:
            self.checkpoints.setdefault(sender, set()).add(checkpoint)

    def note_applied(self, sender: str, round_: int, checkpoint: Optional[int]) -> None:
        self.committed[sender] = max(self.committed.get(sender, 0), round_)
        self.note_checkpoint(sender, checkpoint)

    def common_checkpoint(self, nodes: list[str]) -> int:
        """The newest checkpoint step every one of `nodes` has (PeerFailed when there is none)."""
        common = set.intersection(*(self.checkpoints.get(n, set()) for n in nodes))
        if not common:
            raise PeerFailed(min(nodes, key=lambda n: len(self.checkpoints.get(n, ()))),
                             "no checkpoint step is shared by every node; cannot resume consistently")
        return max(common)


# ---- waits --------------------------------------------------------------------------------------
@dataclass
class _Round:
    """One `kind` message from each pending node (of `round`, when not None)."""
    kind: Kind
    round: Optional[int]
    latest: int  # the coordinator's newest round: DONEs up to it are kept for later collections
    what: str
    timeout_s: float
    deadline: float
    pending: set[str]
    got: dict[str, Received] = field(default_factory=dict)
    extended: bool = False


@dataclass
class _Startup:
    """Every pending node's HELLO."""
    pending: set[str]
    timeout_s: float
    deadline: float
    got: dict[str, Received] = field(default_factory=dict)


@dataclass
class _RestoreAcks:
    """Every pending node's acknowledgement of the RESTORE of `round` (`message`: resent when slow)."""
    round: int
    message: Optional[control.Restore]
    pending: set[str]
    timeout_s: float
    deadline: float
    retry_every: float
    next_retry: float
    got: dict[str, Received] = field(default_factory=dict)


class CoordinatorMachine:
    """The coordinator's receive side. `policy`: the topology's retry policy (timeouts); `roster`: the
    ClientRoster, told when a dropped client announces itself again (not `replaying` a client schedule,
    which decides rejoins itself)."""

    def __init__(self, own: str, nodes: list[str], policy: Any, now: float, roster: Optional[ClientRoster] = None,
                 replaying: bool = False) -> None:
        self.own = own  # the coordinator's node: never declared lost by its own coordinator
        self.liveness = SilenceWatch(policy.heartbeat_timeout_s, now)
        self.policy = policy
        self.book = HelloBook()
        self.roster = roster
        self.replaying = replaying
        self.all_nodes = list(nodes)
        self.nodes = nodes  # the nodes taking part (the roster's active ones)
        self.round = 0  # the last round number given out (start_at: the incarnation's first)
        self.deferred_checkpoint: Optional[int] = None  # written by the next Run (after FedAvg/hand-off)
        self.ahead: dict[tuple[Kind, int], dict[str, Any]] = {}  # DONEs of rounds not collected yet
        self.wait: Union[_Round, _Startup, _RestoreAcks, None] = None

    # -- the run's state: the async shells change it only through these (tests/unit/test_coordinator_state.py)
    def start_at(self, round_: int) -> None:
        self.round = round_

    def next_round(self) -> int:
        """A coordinator-driven round (evaluation, prediction, a restore): its number."""
        self.round += 1
        return self.round

    def run_rounds(self, count: int) -> int:
        """A self-driven Run of `count` steps takes rounds base+1 .. base+count; returns base."""
        base, self.round = self.round, self.round + count
        return base

    def defer_checkpoint(self, step: Optional[int]) -> None:
        self.deferred_checkpoint = step

    def take_deferred_checkpoint(self) -> Optional[int]:
        """The checkpoint the next Run writes, handed out once."""
        step, self.deferred_checkpoint = self.deferred_checkpoint, None
        return step

    def restoring(self) -> int:
        """A restore to a common checkpoint: nothing deferred survives it; the RESTORE round's number."""
        self.deferred_checkpoint = None
        self.ahead.clear()
        return self.next_round()

    def roster_changed(self) -> None:
        """Clients dropped or readmitted: the nodes taking part are the roster's active ones."""
        if self.roster is not None:
            self.nodes = self.roster.active_nodes(self.all_nodes)

    def forget_checkpoints(self, node: str) -> None:
        """A readmitted client's checkpoints from before its drop do not fit this run."""
        self.book.checkpoints[node] = set()

    @property
    def policy(self) -> Any:
        return self._policy

    @policy.setter
    def policy(self, policy: Any) -> None:
        self._policy = policy
        self.liveness.heartbeat_timeout_s = policy.heartbeat_timeout_s

    @property
    def nodes(self) -> list[str]:
        return self._nodes

    @nodes.setter
    def nodes(self, nodes: list[str]) -> None:
        self._nodes, self.node_set = nodes, frozenset(nodes)

    # -- opening a wait ---------------------------------------------------------------------------
    def expect(self, kind: Kind, senders: set[str], round_: Optional[int], latest: int, what: str, now: float,
               timeout_s: Optional[float] = None) -> list[Action]:
        """Wait for one `kind` message from each of `senders` (for `round_`); FAILED fails the run.
        `latest`: the coordinator's newest round (DONEs of rounds up to it are kept for later)."""
        timeout_s = timeout_s or self.policy.timeout_s
        wait = _Round(kind, round_, latest, what, timeout_s, now + timeout_s, set(senders))
        if round_ is not None:
            for sender, message in self.ahead.pop((kind, round_), {}).items():
                if sender in wait.pending:
                    wait.pending.discard(sender)
                    wait.got[sender] = message
        self.wait = wait
        return self._finished()

    def expect_hellos(self, nodes: set[str], timeout_s: float, now: float) -> list[Action]:
        """Every one of `nodes` announces itself (start-up, a lost node coming back)."""
        self.wait = _Startup(set(nodes), timeout_s, now + timeout_s)
        return self._finished()

    def expect_restore_acks(self, round_: int, message: Optional[control.Restore], now: float) -> list[Action]:
        """Every node acknowledges the RESTORE of `round_`; `message`: resend it to the slow and the restarted."""
        retry_every, timeout_s = self.policy.heartbeat_timeout_s, self.policy.startup_timeout_s
        self.wait = _RestoreAcks(round_, message, set(self.nodes), timeout_s, now + timeout_s, retry_every,
                                 now + retry_every)
        return self._finished()

    def wait_s(self, now: float) -> float:
        """How long the driver may wait for the next message before it must Tick again."""
        wait = self.wait
        if isinstance(wait, _Round):
            return max(0.0, min(wait.deadline - now, float(self.policy.heartbeat_interval_s)))
        if isinstance(wait, _RestoreAcks):
            return max(0.001, min(wait.deadline - now, wait.next_retry - now))
        if isinstance(wait, _Startup):
            return max(wait.deadline - now, 0.001)
        return 0.0

    # -- events -----------------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Action]:
        if isinstance(event, Tick):
            return self._tick(event.now)
        if isinstance(event, Exited):
            return self._exited(event)
        message = event.message
        if isinstance(self.wait, _Startup):
            return self._startup_message(event)
        if isinstance(message, control.Failed):
            return self._end(Fail(PeerFailed(event.sender, message.error[:500]))) if self.wait is not None else []
        if isinstance(message, control.Hello):
            return self._hello(event, message)
        if isinstance(self.wait, _RestoreAcks):
            if isinstance(message, control.Ack) and message.of == "restore" and event.round == self.wait.round:
                self.wait.pending.discard(event.sender)
            return self._finished()
        return self._round_message(event)

    def heard_from(self, node: str, now: float) -> None:
        self.liveness.heard_from(node, now)

    def forget(self, node: str) -> None:
        """`node` is gone: its checkpoints do not count and its silence is no longer watched."""
        self.book.checkpoints.pop(node, None)
        self.liveness.forget(node)

    def note_hello(self, sender: str, hello: control.Hello,
                   known_endpoint: Optional[str]) -> tuple[bool, list[Action]]:
        """Record a HELLO (also one a recovery already holds): (from a new process of a node seen before,
        the reroute and client return it calls for)."""
        restarted, endpoint = self.book.note_hello(sender, hello, known_endpoint)
        actions: list[Action] = []
        if endpoint is not None and sender != self.own:
            actions.append(Reroute(sender, endpoint))
        if not self.replaying and self.roster is not None and self.roster.note_return(sender):
            actions.append(ClientBack(sender))
        return restarted, actions

    # -- internals --------------------------------------------------------------------------------
    def _tick(self, now: float) -> list[Action]:
        wait = self.wait
        if isinstance(wait, _Round):
            return self._round_tick(wait, now)
        if isinstance(wait, _Startup) and now >= wait.deadline:
            return self._end(Fail(PeerTimeout(", ".join(sorted(wait.pending)), wait.timeout_s, "start")))
        if isinstance(wait, _RestoreAcks):
            if now >= wait.deadline:
                return self._end(Fail(PeerFailed(sorted(wait.pending)[0], f"did not restore its checkpoint "
                                                                          f"within {wait.timeout_s:.1f}s")))
            if wait.message is not None and now >= wait.next_retry:
                wait.next_retry = now + wait.retry_every
                return [SendRestore(tuple(sorted(wait.pending)), wait.round, wait.message)]
        return []

    def _round_tick(self, wait: _Round, now: float) -> list[Action]:
        if now >= wait.deadline:
            # Nodes that still heartbeat are waiting on the others (a chain behind a frozen hop): name
            # only the silent ones when there are any, so healthy processes are not replaced.
            silent = self.liveness.silent(wait.pending, now, self.own)
            if not silent and not wait.extended:  # everyone is alive, the machine is slow: once more
                wait.extended, wait.deadline = True, now + wait.timeout_s
                return [Extended(tuple(sorted(wait.pending)), wait.what)]
            others = wait.pending - {self.own}  # our own node is not replaced by our own recovery
            why = f"did not {wait.what} within {wait.timeout_s:.1f}s" + (" (no heartbeat either)" if silent else "")
            return self._end(Lost(frozenset(silent or others or wait.pending), why))
        lost = self.liveness.lost(now, self.node_set, self.own)
        if lost:
            return self._end(Lost(frozenset(lost), f"no heartbeat for {self.policy.heartbeat_timeout_s:.1f}s",
                                  cause="heartbeat"))
        return []

    def _exited(self, event: Exited) -> list[Action]:
        """Mid-round, the process this coordinator knows as `sender` ended: recover it now. A report of an
        older process (its replacement said hello already) or outside a round (a start-up or a restore
        waits for the replacement's hello anyway) changes nothing."""
        if not isinstance(self.wait, _Round) or event.sender == self.own or event.sender not in self.node_set \
                or self.book.pids.get(event.sender) != event.pid:
            return []
        return self._end(Lost(frozenset({event.sender}), f"its process ({event.pid}) exited", cause="exited"))

    def _startup_message(self, event: Received) -> list[Action]:
        if not isinstance(event.message, control.Hello) or self.wait is None:
            return []  # FAILED too: nothing runs yet
        self.wait.pending.discard(event.sender)
        _, actions = self.note_hello(event.sender, event.message, event.known_endpoint)
        self.liveness.heard_from(event.sender, event.now)
        return actions + [SendAck(event.sender)] + self._finished()

    def _hello(self, event: Received, hello: control.Hello) -> list[Action]:
        restarted, actions = self.note_hello(event.sender, hello, event.known_endpoint)
        actions.append(SendAck(event.sender))
        wait = self.wait
        if isinstance(wait, _RestoreAcks):
            if wait.message is not None and event.sender in self.node_set:
                wait.pending.add(event.sender)  # restarted after its ack, or its RESTORE got lost: again
                actions.append(SendRestore((event.sender,), wait.round, wait.message))
            return actions + self._finished()
        if wait is None:
            return actions
        if restarted and event.sender != self.own and event.sender in self.node_set:  # dropped: a return
            # A new process said hello mid-round: its old one is gone with the round's state.
            return actions + self._end(Lost(frozenset({event.sender}), "restarted (a new process announced itself)",
                                            cause="restarted", rejoined={event.sender: hello}))
        if isinstance(wait, _Round) and wait.kind == Kind.HELLO and event.sender in wait.pending:
            wait.pending.discard(event.sender)
            wait.got[event.sender] = event
        return actions + self._finished()

    def _round_message(self, event: Received) -> list[Action]:
        message = event.message
        if isinstance(message, control.Ack) and message.of == "checkpoint":
            self.book.note_checkpoint(event.sender, message.checkpoint)
            return []
        if isinstance(message, control.Done) and event.phase == "train":
            self.book.note_applied(event.sender, event.round, message.checkpoint)  # applied there
        wait = self.wait
        if not isinstance(wait, _Round):
            return []  # no wait open (a startup or a restore wait takes no round messages: see handle)
        kind = message.kind
        if wait.round is not None and wait.round < event.round <= wait.latest and kind == wait.kind == Kind.DONE:
            # A node already finished a later self-driven step: keep it for that step's collection.
            self.ahead.setdefault((kind, event.round), {})[event.sender] = event
            return []
        if kind != wait.kind or event.sender not in wait.pending or (wait.round is not None
                                                                     and event.round != wait.round):
            return []  # late duplicates of earlier rounds
        wait.pending.discard(event.sender)
        wait.got[event.sender] = event
        return self._finished()

    def _finished(self) -> list[Action]:
        wait = self.wait
        if wait is not None and not wait.pending:
            return self._end(Collected(wait.got))
        return []

    def _end(self, action: Action) -> list[Action]:
        self.wait = None
        return [action]

