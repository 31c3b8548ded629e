"""Liveness, the node's I/O-free view of the coordinator: time only through events, decisions out."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from meshsl.machines import liveness as lv

pytestmark = pytest.mark.unit

POLICY = SimpleNamespace(heartbeat_interval_s=1.0, heartbeat_timeout_s=10.0, startup_timeout_s=30.0,
                         coordinator_timeout_s=None)


def client(**policy) -> lv.Liveness:
    return lv.Liveness("client", "server", ["client", "server"], SimpleNamespace(**{**vars(POLICY), **policy}),
                       hosts_coordinator=False, now=0.0)


def test_a_tick_heartbeats_the_coordinator_and_nothing_more_while_it_is_heard():
    live = client()
    live.handle(lv.HelloAcked())
    live.handle(lv.CoordinatorHeard(5.0))
    assert live.handle(lv.Tick(6.0)) == [lv.SendHeartbeat("server")]
    assert live.contacted and live.joined and live.hello_acked


def test_a_silent_coordinator_is_marked_down_and_announced_to_again():
    live = client()
    live.handle(lv.HelloAcked())
    assert live.handle(lv.Tick(10.5)) == [lv.SendHeartbeat("server"), lv.PeerDown("server"),
                                          lv.Announce("silent for 10.5s")]
    assert not live.hello_acked and live.joined
    assert live.handle(lv.Tick(11.5)) == [lv.SendHeartbeat("server")]  # announcing already


def test_past_every_limit_a_joined_node_gives_up_on_the_run():
    live = client()
    live.handle(lv.HelloAcked())
    decisions = live.handle(lv.Tick(40.5))  # heartbeat_timeout_s + startup_timeout_s
    assert isinstance(decisions[-1], lv.GiveUp) and decisions[-1].aborted
    assert "silent for 40.5s" in decisions[-1].reason


def test_the_declared_coordinator_timeout_wins():
    live = client(coordinator_timeout_s=5.0)
    live.handle(lv.HelloAcked())
    assert isinstance(live.handle(lv.Tick(5.5))[-1], lv.GiveUp)
    assert lv.coordinator_silence_limit(POLICY) == 40.0


def test_before_joining_a_node_never_gives_up_on_a_tick():
    live = client()
    assert live.handle(lv.Tick(1000.0)) == [lv.SendHeartbeat("server")]


def test_started_resets_the_silence():
    live = client()
    live.handle(lv.HelloAcked())
    live.handle(lv.Started(100.0))
    assert live.handle(lv.Tick(101.0)) == [lv.SendHeartbeat("server")]


def test_an_unanswered_hello_waits_for_start_up_before_joining_and_less_after():
    live = client()
    assert live.handle(lv.HelloUnanswered(now=70.0, since=0.0, refused=0)) == []
    assert isinstance(live.handle(lv.HelloUnanswered(now=70.5, since=0.0, refused=0))[0], lv.GiveUp)
    live.handle(lv.HelloAcked())
    assert isinstance(live.handle(lv.HelloUnanswered(now=41.0, since=0.0, refused=0))[0], lv.GiveUp)


def test_a_refused_key_stops_the_node_after_the_startup_timeout_without_aborting():
    live = client()
    assert live.handle(lv.HelloUnanswered(now=29.0, since=0.0, refused=3)) == []
    [decision] = live.handle(lv.HelloUnanswered(now=31.0, since=0.0, refused=3))
    assert not decision.aborted and "refused its CURVE key 3 times" in decision.reason


def test_a_new_coordinator_process_means_announcing_again():
    live = client()
    live.handle(lv.HelloAcked())
    assert live.handle(lv.IncarnationHeard("a")) == []
    assert live.handle(lv.IncarnationHeard("a")) == []
    assert live.handle(lv.IncarnationHeard("b")) == [lv.Announce("restarted")]
    assert not live.hello_acked
    assert live.handle(lv.IncarnationHeard("c")) == []  # not acknowledged: announcing already
    assert live.handle(lv.IncarnationHeard(7)) == [] and live.coordinator_incarnation == "c"


def test_the_coordinators_host_heartbeats_every_peer_and_watches_no_one():
    live = lv.Liveness("server", "server", ["client-0", "server", "client-1"], POLICY, hosts_coordinator=True,
                       now=0.0)
    assert live.handle(lv.Tick(1000.0)) == [lv.SendHeartbeat("client-0"), lv.SendHeartbeat("client-1")]
    assert live.handle(lv.IncarnationHeard("x")) == []


def test_heartbeats_are_thinned_for_a_peer_recently_sent_to():
    live = client()
    assert live.heartbeat_due("server", now=10.0, last_sent=0.0)
    assert not live.heartbeat_due("server", now=10.5, last_sent=10.2)  # sent to, heartbeat recent
    assert live.heartbeat_due("server", now=15.1, last_sent=15.0)  # half the timeout since the last one


def test_shutdown_finishes_only_once_compute_is_idle():
    live = client()
    assert not live.finished(compute_idle=True)
    live.request_shutdown()
    assert not live.finished(compute_idle=False)
    assert live.finished(compute_idle=True)


def test_an_unknown_event_is_a_programming_error():
    with pytest.raises(TypeError):
        client().handle(object())
