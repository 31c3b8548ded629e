"""The ZeroMQ backend's parts without sockets: who sent a frame set (routes learned, CURVE identities
checked), and which dialled peer a monitor event's endpoint names."""
from __future__ import annotations

from meshsl.transport.base import SPOOFED_PREFIX
from meshsl.transport.zmq_dial_out import DialOutLinks
from meshsl.transport.zmq_inbound import InboundRoutes


class Frame:
    """What `zmq.Frame` offers the receive side: its bytes, its length and the ZAP User-Id."""

    def __init__(self, data: bytes, user: str | None = None) -> None:
        self.bytes, self._user = data, user

    def __len__(self) -> int:
        return len(self.bytes)

    def get(self, key: str):
        assert key == "User-Id"
        return self._user


BOOK = {"lab": "tcp://127.0.0.1:5000", "hospital": None}  # hospital dials out


def test_a_dial_out_announcement_teaches_the_route_back():
    inbound = InboundRoutes("lab", dial_out=False, keyring=None)
    frames = [Frame(b"hospital#a1b2"), Frame(b"")]
    assert inbound.is_announcement(frames, BOOK)
    assert inbound.identify(frames, BOOK) == ("hospital", frames[1:])
    assert inbound.routes == {"hospital": b"hospital#a1b2"}


def test_an_empty_message_from_a_bound_peer_is_no_announcement():
    inbound = InboundRoutes("lab", dial_out=False, keyring=None)
    assert not inbound.is_announcement([Frame(b"lab#x"), Frame(b"")], BOOK)  # lab accepts: no route to learn
    assert not inbound.is_announcement([Frame(b"hospital"), Frame(b"")], BOOK)  # no nonce: not a route
    assert not inbound.is_announcement([Frame(b"hospital#x"), Frame(b"data")], BOOK)
    assert inbound.routes == {}


def test_with_curve_the_authenticated_name_wins_over_the_routing_id():
    inbound = InboundRoutes("lab", dial_out=False, keyring=object())
    sender, _ = inbound.identify([Frame(b"hospital#x"), Frame(b"m", user="mallory")], BOOK)
    assert sender == f"{SPOOFED_PREFIX}mallory:hospital"
    assert inbound.routes == {}  # a route is learned only from its own key's messages
    sender, _ = inbound.identify([Frame(b"hospital#x"), Frame(b"m", user="hospital")], BOOK)
    assert sender == "hospital" and inbound.routes == {"hospital": b"hospital#x"}


def test_on_a_dial_out_node_the_alias_names_the_peer():
    inbound = InboundRoutes("hospital", dial_out=True, keyring=object())
    frames = [Frame(b"lab#3"), Frame(b"")]
    assert inbound.is_announcement(frames, BOOK)
    assert inbound.identify([Frame(b"lab#3"), Frame(b"m")], BOOK)[0] == "lab" and inbound.routes == {}


def test_a_monitor_endpoint_is_matched_to_the_dialled_peer_by_port():
    links = DialOutLinks("hospital", None, on_connected=lambda: None, on_refused_by=lambda peer, why: None)
    links.alias_endpoints = {"tcp://lab.example:5000": "lab", "tcp://10.0.0.2:5001": "relay"}
    assert links.peer_at("tcp://lab.example:5000") == "lab"
    assert links.peer_at("tcp://10.0.0.1:5000") == "lab"  # libzmq reports the address it resolved
    links.alias_endpoints["tcp://other:5000"] = "other"
    assert links.peer_at("tcp://10.0.0.1:5000") is None  # two peers on that port: no guess
