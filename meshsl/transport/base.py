"""The transport interface every backend implements, chosen by endpoint scheme."""
from __future__ import annotations

import abc
from typing import Callable, Mapping, Optional, Sequence

# Sender identity a transport returns for a peer whose authenticated (CURVE) name and routing id
# disagree; the node rejects it as "spoofed_sender". Routing ids may not start with a zero byte.
SPOOFED_PREFIX = "\x00spoofed:"


class Transport(abc.ABC):
    """Bound to one node's endpoint; sends frames to peers by node name, receives (sender, frames).

    The sender of a received message is the transport-level identity (authenticated with CURVE when on),
    never a field the peer wrote into the header.

    `endpoint` None: a dial-out node that binds nothing; an address-book entry None: a dial-out peer,
    reached over the connection it opened to us.

    Capabilities are declared here, with defaults a backend overrides, so callers never probe for them:
    `threadsafe_send` (whether `try_send_threadsafe` can ever succeed), `bind` (where to bind when that
    differs from `endpoint`), `refused_by` (peer -> CURVE handshakes it refused), `on_dropped` (called
    when the socket drops a connection; set before `start`) and `sent_hook(sender, peer, frames)` (sees
    every message sent: the wire audit, `meshsl audit-wire`)."""

    threadsafe_send: bool = False
    bind: Optional[str] = None

    def __init__(self, node: str, endpoint: Optional[str], address_book: Mapping[str, Optional[str]]) -> None:
        self.node = node
        self.endpoint = endpoint
        self.address_book = dict(address_book)
        self.refused_by: dict[str, int] = {}
        self.on_dropped: Optional[Callable[[], None]] = None
        self.sent_hook: Optional[Callable[[str, str, Sequence], None]] = None

    @property
    def bind_address(self) -> Optional[str]:
        """Where this transport listens (a standby waits for it to be free)."""
        return self.bind or self.endpoint

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def send(self, peer: str, frames: Sequence) -> None:
        """Queue frames for `peer`; waits (backpressure) when the peer's queue is full."""

    def try_send(self, peer: str, frames: Sequence) -> bool:
        """Send now if that needs no waiting (the caller holds no earlier message for `peer`).

        True: sent. False: nothing was sent; use `send` (which may wait). The node's hot path uses this
        to skip a task switch per message when the peer keeps up."""
        return False

    def try_send_threadsafe(self, peer: str, frames: Sequence) -> bool:
        """`try_send` from a thread other than the event loop's; only backends declaring
        `threadsafe_send` ever send here (the default sends nothing: the caller hands over to the loop)."""
        return False

    @abc.abstractmethod
    async def recv(self) -> tuple[str, list]:
        """The next message: (sender node name, frames)."""

    def recv_nowait(self) -> Optional[tuple[str, list]]:
        """The next message if one is already here, else None; never waits. Not to be mixed with a
        `recv` in flight. The default has none, so callers fall back to `recv`."""
        return None

    @abc.abstractmethod
    async def close(self) -> None: ...

    def reroute(self, peer: str, endpoint: str) -> None:
        """Send to `peer` at a new endpoint from now on (failover to a standby)."""
        self.address_book[peer] = endpoint


# Endpoint scheme -> backend factory. Backends register themselves (meshsl/transport/__init__.py imports
# them), so this interface never imports its implementations.
_BACKENDS: dict[Optional[str], Callable[..., Transport]] = {}
DEFAULT_BACKEND = None  # the scheme key of the backend for every endpoint no other backend claims


def register_backend(scheme: Optional[str], factory: Callable[..., Transport]) -> None:
    """`factory(node, endpoint, address_book, **options)` builds transports for endpoints `scheme://...`
    (None: the fallback for any endpoint, and for a dial-out node without one)."""
    _BACKENDS[scheme] = factory


def make_transport(node: str, endpoint: Optional[str], address_book: dict[str, Optional[str]], **options) -> Transport:
    """The registered backend for `endpoint`'s scheme. `in_process=False` sends `inproc://` endpoints to the
    fallback backend (ZeroMQ's own inproc transport) instead of the in-process queues."""
    in_process = options.pop("in_process", True)
    scheme = endpoint.split("://", 1)[0] if endpoint and "://" in endpoint else None
    factory = _BACKENDS.get(scheme) if in_process or scheme != "inproc" else None
    return (factory or _BACKENDS[DEFAULT_BACKEND])(node, endpoint, address_book, **options)
