"""The coordinator's receive side (machines/coordinator.py) driven by event sequences: no
processes, no sockets, no clock but the events'."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from meshsl.errors import PeerFailed, PeerTimeout
from meshsl.protocol.envelope import Envelope, Kind
from meshsl.errors import ProtocolError
from meshsl.machines.coordinator import (
    ClientBack, Collected, CoordinatorMachine, Exited, Extended, Fail, Lost, Received, Reroute, SendAck, SendRestore,
    Tick, event_of,
)
from meshsl.protocol import control
from meshsl.machines.policies import ClientRoster

pytestmark = pytest.mark.unit

NODES = ["server", "a", "b"]  # "server" hosts the coordinator
POLICY = SimpleNamespace(timeout_s=10.0, heartbeat_interval_s=1.0, heartbeat_timeout_s=5.0, startup_timeout_s=60.0,
                         max_restarts=3)


def machine(now: float = 0.0, **kwargs) -> CoordinatorMachine:
    m = CoordinatorMachine("server", list(NODES), POLICY, now, **kwargs)
    for name in NODES:
        m.heard_from(name, now)
    return m


def done(sender: str, round_: int, **fields) -> Received:
    return Received(sender, round_, "train", control.Done(**fields))


def hello(sender: str, now: float, known_endpoint=None, **fields) -> Received:
    return Received(sender, 0, "control", control.Hello(**fields), now, known_endpoint)


def ack(sender: str, of: str, round_: int, **fields) -> Received:
    return Received(sender, round_, "control", control.Ack(of=of, **fields))


def failed(sender: str, error: str) -> Received:
    return Received(sender, 0, "control", control.Failed(error=error))


def feed(m: CoordinatorMachine, *events) -> list:
    actions = []
    for event in events:
        actions += m.handle(event)
    return actions


def test_every_node_done_collects_their_messages():
    m = machine()
    assert m.expect(Kind.DONE, set(NODES), 1, latest=1, what="finish its step", now=0.0) == []
    assert feed(m, Tick(0.5), done("server", 1), done("a", 1)) == []
    assert feed(m, done("b", 1)) == [Collected({n: done(n, 1) for n in ("server", "a", "b")})]
    assert m.wait is None
    assert m.book.committed == {"server": 1, "a": 1, "b": 1}


def test_late_duplicates_and_other_kinds_do_not_count():
    m = machine()
    m.expect(Kind.DONE, {"a"}, 5, latest=5, what="finish its step", now=0.0)
    weights = Received("a", 5, "control", control.Weights(segment="bottom"))
    assert feed(m, done("a", 4), weights, ack("a", "weights", 5)) == []
    assert feed(m, done("a", 5)) == [Collected({"a": done("a", 5)})]


def test_a_silent_node_past_the_heartbeat_timeout_is_lost_on_tick():
    m = machine()
    m.expect(Kind.DONE, set(NODES), 1, latest=1, what="finish its step", now=0.0)
    for t in (1.0, 2.0, 3.0, 4.0, 5.0):
        m.heard_from("server", t)
        m.heard_from("a", t)
        assert m.handle(Tick(t)) == [], t
    (lost,) = m.handle(Tick(5.5))
    assert isinstance(lost, Lost) and lost.nodes == {"b"} and lost.cause == "heartbeat"
    assert m.wait is None


def test_a_paused_coordinator_blames_nobody_for_its_own_silence():
    m = machine()
    m.expect(Kind.DONE, set(NODES), 1, latest=1, what="finish its step", now=0.0, timeout_s=100.0)
    assert m.handle(Tick(20.0)) == []  # 20 s without a look at the clock: the silence was ours
    assert m.handle(Tick(21.0)) == []
    assert m.handle(Tick(23.0)) == []
    m.heard_from("a", 24.0)
    (lost,) = m.handle(Tick(25.5))  # the clocks started afresh at 20.0; the coordinator's own node is exempt
    assert lost.nodes == {"b"}


def test_a_round_timeout_names_the_silent_nodes_and_waits_once_more_when_all_are_alive():
    m = machine()
    m.expect(Kind.DONE, {"a", "b"}, 1, latest=1, what="finish its step", now=0.0, timeout_s=3.0)
    m.heard_from("a", 3.0)
    m.heard_from("b", 3.0)
    assert m.handle(Tick(3.0)) == [Extended(("a", "b"), "finish its step")]
    m.heard_from("a", 6.0)
    (lost,) = m.handle(Tick(6.0))  # b silent since 3.0 is not past the heartbeat timeout: both named
    assert lost.nodes == {"a", "b"} and lost.cause == "timeout" and "within 3.0s" in lost.why
    slow = machine()
    slow.expect(Kind.DONE, {"a", "b"}, 1, latest=1, what="finish its step", now=0.0, timeout_s=3.0)
    slow.liveness.last_check = 3.0
    slow.heard_from("a", 3.0)
    (lost,) = slow.handle(Tick(5.5))  # b last heard at 0.0: silent, only it is named
    assert lost.nodes == {"b"} and "no heartbeat either" in lost.why


def test_the_coordinators_own_node_is_never_named_lost():
    m = machine()
    m.expect(Kind.DONE, {"server", "a"}, 1, latest=1, what="finish its step", now=0.0, timeout_s=2.0)
    m.heard_from("a", 2.0)
    assert isinstance(m.handle(Tick(2.0))[0], Extended)
    m.heard_from("a", 4.0)
    (lost,) = m.handle(Tick(4.0))
    assert lost.nodes == {"a"}


def test_hello_from_a_new_incarnation_mid_round_is_lost_as_restarted():
    m = machine()
    m.expect_hellos(set(NODES), 60.0, now=0.0)
    feed(m, *(hello(n, 0.1, incarnation=f"{n}-1") for n in NODES))
    m.expect(Kind.DONE, set(NODES), 1, latest=1, what="finish its step", now=1.0)
    assert feed(m, hello("a", 1.1, incarnation="a-1")) == [SendAck("a")]  # the same process: a retry
    actions = feed(m, hello("a", 1.2, incarnation="a-2", checkpoints=(0, 2)))
    assert actions[0] == SendAck("a")
    lost = actions[1]
    assert isinstance(lost, Lost) and lost.nodes == {"a"} and lost.cause == "restarted"
    assert lost.rejoined == {"a": control.Hello(incarnation="a-2", checkpoints=(0, 2))}
    assert m.book.checkpoints["a"] == {0, 2}


def test_an_exit_report_mid_round_loses_exactly_that_node_at_once():
    """The launcher saw the process of "a" end (a lost node as an event): no heartbeat or round timeout is
    waited for, and only "a" is named, however long the heartbeat timeout."""
    m = machine()
    m.expect_hellos(set(NODES), 60.0, now=0.0)
    feed(m, *(hello(n, 0.1, incarnation=f"{n}-1", pid=100 + i) for i, n in enumerate(NODES)))
    m.expect(Kind.DONE, set(NODES), 1, latest=1, what="finish its step", now=1.0)
    assert feed(m, Tick(1.1)) == []
    (lost,) = feed(m, Exited("a", 101))
    assert isinstance(lost, Lost) and lost.nodes == {"a"} and lost.cause == "exited" and "101" in lost.why
    assert m.wait is None


def test_exit_reports_of_other_processes_or_outside_a_round_change_nothing():
    m = machine()
    m.expect_hellos(set(NODES), 60.0, now=0.0)
    assert feed(m, Exited("a", 101)) == []  # start-up: the replacement's hello is waited for anyway
    feed(m, *(hello(n, 0.1, incarnation=f"{n}-1", pid=100 + i) for i, n in enumerate(NODES)))
    m.expect(Kind.DONE, set(NODES), 1, latest=1, what="finish its step", now=1.0)
    assert feed(m, Exited("a", 999)) == []  # not the process "a" said hello from (an older one)
    assert feed(m, Exited("server", 100)) == []  # the coordinator's own node: never its own recovery
    assert feed(m, Exited("mallory", 7)) == []
    (_, lost) = feed(m, hello("a", 1.2, incarnation="a-2", pid=555))  # the replacement came first
    assert lost.cause == "restarted"
    m.expect(Kind.DONE, set(NODES), 2, latest=2, what="finish its step", now=2.0)
    assert feed(m, Exited("a", 101)) == []  # the late report of the process it replaced
    assert m.expect_restore_acks(3, control.Restore(checkpoint=0, round=3), now=3.0) == []
    assert feed(m, Exited("a", 555)) == []  # a restore: its replacement's hello resends the RESTORE anyway
    assert m.wait is not None and m.wait.pending == set(NODES)


def test_failed_fails_the_run_with_the_typed_error():
    m = machine()
    m.expect(Kind.DONE, set(NODES), 1, latest=1, what="finish its step", now=0.0)
    (fail,) = m.handle(failed("b", "out of memory" + "!" * 1000))
    assert isinstance(fail, Fail) and isinstance(fail.error, PeerFailed)
    assert fail.error.peer == "b" and "out of memory" in str(fail.error) and len(str(fail.error)) < 600


def test_dones_of_a_later_round_are_kept_until_that_round_is_collected():
    m = machine()
    m.expect(Kind.DONE, set(NODES), 1, latest=3, what="finish its step", now=0.0)
    assert feed(m, done("a", 2), done("a", 3), done("b", 4)) == []  # round 4 is not begun: dropped
    assert m.book.committed["a"] == 3
    assert feed(m, *(done(n, 1) for n in NODES))[-1] == Collected({n: done(n, 1) for n in NODES})
    m.expect(Kind.DONE, set(NODES), 2, latest=3, what="finish its step", now=0.0)
    assert feed(m, done("server", 2), done("b", 2)) == [Collected({n: done(n, 2) for n in ("a", "server", "b")})]
    assert m.expect(Kind.DONE, {"a"}, 3, latest=3, what="finish its step", now=0.0) == [Collected({"a": done("a", 3)})]


def test_hello_with_a_new_endpoint_reroutes_and_is_acknowledged():
    m = machine()
    m.expect(Kind.DONE, set(NODES), 1, latest=1, what="finish its step", now=0.0)
    actions = m.handle(hello("b", 0.5, "tcp://10.0.0.2:7000", endpoint="tcp://10.0.0.9:7000"))
    assert actions == [Reroute("b", "tcp://10.0.0.9:7000"), SendAck("b")]
    assert m.book.endpoints["b"] == "tcp://10.0.0.9:7000"
    assert m.handle(hello("b", 0.6, "tcp://10.0.0.9:7000", endpoint="tcp://10.0.0.9:7000")) == [SendAck("b")]
    assert m.handle(hello("server", 0.7, "tcp://y:1", endpoint="tcp://x:1")) == [SendAck("server")]


def test_startup_waits_for_every_hello_and_times_out_naming_the_missing():
    m = CoordinatorMachine("server", list(NODES), POLICY, 0.0)
    assert m.expect_hellos(set(NODES), 30.0, now=0.0) == []
    assert feed(m, failed("a", "ignored before the run"), hello("a", 1.0, predict_rows=12)) == [SendAck("a")]
    assert m.liveness.heard["a"] == 1.0 and m.book.predict_rows == {"a": 12}
    assert m.handle(Tick(29.0)) == []
    (fail,) = m.handle(Tick(30.0))
    assert isinstance(fail.error, PeerTimeout) and fail.error.peer == "b, server"
    m.expect_hellos({"a"}, 30.0, now=31.0)
    assert m.handle(hello("a", 31.5)) == [SendAck("a"), Collected({})]


def test_restore_acks_are_retried_for_the_slow_and_the_restarted():
    m = machine()
    meta = control.Restore(checkpoint=4, round=7)
    assert m.expect_restore_acks(7, meta, now=0.0) == []
    assert feed(m, ack("server", "restore", 7), ack("a", "restore", 6)) == []
    assert m.wait_s(0.0) == POLICY.heartbeat_timeout_s
    assert m.handle(Tick(5.0)) == [SendRestore(("a", "b"), 7, meta)]
    assert feed(m, ack("a", "restore", 7), hello("a", 5.5)) == [SendAck("a"), SendRestore(("a",), 7, meta)]
    assert feed(m, ack("b", "restore", 7)) == []
    assert feed(m, ack("a", "restore", 7)) == [Collected({})]


def test_restore_acks_fail_past_the_startup_timeout():
    m = machine()
    m.expect_restore_acks(7, None, now=0.0)
    assert m.handle(Tick(59.0)) == []  # no meta: nothing to resend
    (fail,) = m.handle(Tick(60.0))
    assert isinstance(fail.error, PeerFailed) and fail.error.peer == "a"


def test_checkpoint_acks_and_training_dones_record_checkpoints():
    m = machine()
    m.expect(Kind.WEIGHTS, {"a"}, 2, latest=2, what="send weights", now=0.0)
    assert feed(m, ack("a", "checkpoint", 2, checkpoint=8), done("b", 2, checkpoint=10)) == []
    assert m.book.checkpoints == {"a": {8}, "b": {10}}
    assert m.book.common_checkpoint(["a"]) == 8
    with pytest.raises(PeerFailed):
        m.book.common_checkpoint(["a", "b"])
    weights = Received("a", 2, "control", control.Weights(segment="bottom"), tensors=["w"])
    assert m.handle(weights) == [Collected({"a": weights})]


def test_a_dropped_client_announcing_itself_is_noted_as_back():
    roster = ClientRoster({0: ["a"], 1: ["b"]}, on_loss="drop", min_clients=1)
    m = machine(roster=roster)
    roster.drop(["b"], 3, "heartbeat")
    m.nodes = ["server", "a"]
    m.expect(Kind.DONE, {"server", "a"}, 1, latest=1, what="finish its step", now=0.0)
    assert m.handle(hello("b", 0.5)) == [ClientBack("b"), SendAck("b")]
    assert m.wait is not None  # not a node of the run now: no loss
    replaying = machine(roster=ClientRoster({0: ["a"], 1: ["b"]}, on_loss="drop", min_clients=1), replaying=True)
    replaying.roster.drop(["b"], 3, "replayed")
    assert replaying.handle(hello("b", 0.5)) == [SendAck("b")]


def test_inbox_messages_become_typed_events():
    """Every message a node sends the coordinator arrives as its control.* class; garbage is refused."""
    hello_ = Envelope(Kind.HELLO, "t", "a", meta={"endpoint": "tcp://h:1", "incarnation": "a-1"})
    assert event_of("a", hello_, (), 2.0, "tcp://h:0") == Received(
        "a", 0, "control", control.Hello(endpoint="tcp://h:1", incarnation="a-1"), 2.0, "tcp://h:0", hello_, ())
    failed_ = Envelope(Kind.FAILED, "t", "a", meta={"error": "boom"})
    assert event_of("a", failed_, (), 0.0).message == control.Failed(error="boom")
    ack_ = Envelope(Kind.ACK, "t", "a", step=3, meta={"of": "restore", "checkpoint": 2})
    assert event_of("a", ack_, (), 0.0).message == control.Ack(of="restore", checkpoint=2)
    step = Envelope(Kind.DONE, "t", "a", phase="eval", step=4, meta={"tasks": {"t": {"count": 3, "correct": 2}}})
    event = event_of("a", step, (), 0.0)
    assert (event.round, event.phase, event.message.tasks) == (4, "eval", {"t": {"count": 3, "correct": 2}})
    weights = Envelope(Kind.WEIGHTS, "t", "a", step=5, meta={"segment": "bottom"})
    assert event_of("a", weights, ("w",), 0.0).message == control.Weights(segment="bottom")
    for garbage in (Envelope(Kind.DONE, "t", "a", meta={"bytes": {"e|forward": "many"}}),
                    Envelope(Kind.HELLO, "t", "a", meta={"incarnation": 7}),
                    Envelope(Kind.ACTIVATION, "t", "a")):
        with pytest.raises(ProtocolError):
            event_of("a", garbage, (), 0.0)
