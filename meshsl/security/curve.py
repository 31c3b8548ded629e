"""CURVE encryption and the ZAP allow-list for a node's zmq sockets (asyncio).

How identities flow: a node's ROUTER is a CURVE server in ZAP domain "meshsl". Each incoming
handshake is checked by the authenticator against the key ring; an accepted key is mapped to its
node name, which libzmq then attaches to every frame from that connection as the `User-Id`
property (`frame.get("User-Id")` on frames received with `copy=False`). A peer therefore cannot
claim another node's name in its routing id without also holding that node's secret key.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import Counter
from typing import Any, Callable, cast
from urllib.parse import urlsplit

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from meshsl.errors import AuthError
from meshsl.security.keys import KeyRing

log = logging.getLogger("meshsl.security")

ZAP_DOMAIN = "meshsl"
REFUSED_UNKNOWN_KEY = "unknown_key"

RefusalCallback = Callable[[str], None]


class AllowListProvider:
    """ZAP credentials provider: accept exactly the key ring's keys, count and report the rest."""

    def __init__(self, keyring: KeyRing, on_refused: RefusalCallback | None = None) -> None:
        self.keyring = keyring
        self.on_refused = on_refused
        self.refusals: Counter[str] = Counter()

    def callback(self, domain: str, key: bytes) -> bool:
        # pyzmq hands the key over already z85-encoded.
        node = self.keyring.node_for_key(key)
        if node is not None:
            log.debug("CURVE: accepted node %r (domain %s)", node, domain)
            return True
        shown = key.decode("ascii", "replace") if isinstance(key, bytes) else str(key)
        log.warning("CURVE: refused a connection with unknown public key %s (domain %s)", shown, domain)
        self.refusals[REFUSED_UNKNOWN_KEY] += 1
        if self.on_refused is not None:
            try:
                self.on_refused(REFUSED_UNKNOWN_KEY)
            except Exception:  # a faulty metrics hook must not stop authentication
                log.exception("on_refused callback failed")
        return False


class MeshAuthenticator(AsyncioAuthenticator):
    """AsyncioAuthenticator whose ZAP `User-Id` is the node name instead of the raw key."""

    def __init__(self, context: zmq.Context, provider: AllowListProvider) -> None:
        super().__init__(context, log=logging.getLogger("meshsl.security.zap"))
        self.provider = provider

    @property
    def refusals(self) -> Counter[str]:
        return self.provider.refusals

    def curve_user_id(self, client_public_key: bytes) -> str:
        # Called only after the provider accepted the key, with the raw 32-byte key.
        key = z85.encode(client_public_key)
        node = self.provider.keyring.node_for_key(key)
        return node if node is not None else key.decode("ascii")


async def start_authenticator(
    ctx: zmq.Context, keyring: KeyRing, on_refused: RefusalCallback | None = None
) -> MeshAuthenticator:
    """Start the ZAP handler for `ctx` (one per context); stop it with `auth.stop()`.

    Must run inside the event loop that serves the sockets. Only CURVE handshakes reach the
    callback: a plain-text client is rejected by libzmq before ZAP (see HandshakeMonitor)."""
    if not zmq.has("curve"):
        raise AuthError("this libzmq was built without CURVE support")
    provider = AllowListProvider(keyring, on_refused)
    if not isinstance(ctx, zmq.asyncio.Context):  # the ZAP handler awaits its socket: an asyncio view of ctx
        ctx = zmq.asyncio.Context.shadow(ctx.underlying)
    auth = MeshAuthenticator(ctx, provider)
    auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=provider)
    try:
        auth.start()
    except zmq.ZMQError as exc:
        raise AuthError(f"cannot start the ZAP authenticator (one per context): {exc}") from None
    return auth


def configure_server(sock: zmq.Socket, keyring: KeyRing) -> None:
    """Make `sock` (the node's ROUTER) a CURVE server checked by the authenticator. Call before bind."""
    sock.curve_secretkey = keyring.secret_key
    sock.curve_publickey = keyring.public_key
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN.encode()


def configure_client(sock: zmq.Socket, keyring: KeyRing, server_node: str) -> None:
    """Make `sock` (a DEALER towards `server_node`) a CURVE client. Call before connect."""
    sock.curve_serverkey = keyring.public_key_of(server_node)
    sock.curve_publickey = keyring.public_key
    sock.curve_secretkey = keyring.secret_key


# Handshake failures seen on a CURVE server socket, by bounded reason label.
_HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",  # ZAP refused the key
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",  # e.g. a plain-text (NULL) client
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no_detail",
}


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def next_monitor_event(monitor: zmq.Socket) -> Any:
    """The next event of a socket monitor, awaited on the event loop: an asyncio socket's own future, or a
    plain socket's fd (edge-triggered: EVENTS is checked again after every wake-up)."""
    if isinstance(monitor, zmq.asyncio.Socket):
        return await recv_monitor_message(monitor)
    loop = asyncio.get_running_loop()
    while True:
        try:
            return recv_monitor_message(monitor, zmq.NOBLOCK)
        except zmq.Again:
            pass
        if cast(int, monitor.get(zmq.EVENTS)) & zmq.POLLIN:
            continue
        waiter = loop.create_future()
        fd = monitor.FD
        loop.add_reader(fd, _wake, waiter)
        try:
            await waiter
        finally:
            loop.remove_reader(fd)


class HandshakeMonitor:
    """Counts failed handshakes on a socket through a zmq socket monitor.

    This sees what the ZAP callback cannot: plain-text clients and garbled handshakes."""

    def __init__(self, sock: zmq.Socket, on_failure: RefusalCallback | None = None,
                 on_dropped: Callable[[], None] | None = None) -> None:
        """`on_dropped`: called for each connection dropped after its handshake succeeded (a frame
        above MAXMSGSIZE, a peer gone); a failed handshake's own disconnection is not reported again."""
        self.failures: Counter[str] = Counter()
        self._on_failure = on_failure
        self._on_dropped = on_dropped
        self._failed_unmatched = 0  # failed handshakes whose disconnection is still to come
        events = 0
        for event in _HANDSHAKE_FAILURES:
            events |= event
        if on_dropped is not None:
            events |= zmq.EVENT_DISCONNECTED
        self._sock = sock
        self._monitor = sock.get_monitor_socket(events)
        self._task = asyncio.ensure_future(self._run())

    @property
    def total(self) -> int:
        return sum(self.failures.values())

    async def _run(self) -> None:
        while True:
            try:
                event = await next_monitor_event(self._monitor)
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                if self._failed_unmatched:
                    self._failed_unmatched -= 1
                elif self._on_dropped is not None:
                    self._on_dropped()
                continue
            reason = _HANDSHAKE_FAILURES.get(event["event"])
            if reason is None:
                continue
            self.failures[reason] += 1
            self._failed_unmatched += 1
            log.warning(
                "handshake failed (%s) on %s", reason, event["endpoint"].decode("utf-8", "replace")
            )
            if self._on_failure is not None:
                try:
                    self._on_failure(reason)
                except Exception:
                    log.exception("on_failure callback failed")

    def close_now(self) -> None:
        """Stop without awaiting (for sync callers such as a re-route); the task ends on its own."""
        self._task.cancel()
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)

    async def stop(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass  # the socket may already be closed
        self._monitor.close(linger=0)


def is_loopback(endpoint: str) -> bool:
    """True if `endpoint` cannot be reached from another host (loopback TCP, ipc://, inproc://)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return False
    scheme = scheme.lower()
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False  # ws, pgm, udp, ... are treated as exposed
    host = rest.rsplit(";", 1)[-1]  # "src;dst" form: the destination decides
    host = urlsplit(f"//{host}").hostname or ""
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        # "*", 0.0.0.0, interface names and other host names may be reachable: assume exposed.
        return False


_PLAINTEXT_BANNER = """
##################################################################
#  SECURITY WARNING: binding {endpoint} WITHOUT CURVE
#  Anyone who can reach this address can read activations and
#  gradients and inject messages. Enable `security: {{curve: true,
#  keys_dir: ...}}` in the topology (see `meshsl keys generate`)
#  or bind to 127.0.0.1 / ipc:// only.
##################################################################"""


def warn_if_plaintext_exposed(endpoint: str, curve_enabled: bool, logger: logging.Logger | None = None) -> bool:
    """Log a loud banner when a non-loopback endpoint is bound without CURVE; True if it warned."""
    if curve_enabled or is_loopback(endpoint):
        return False
    (logger or log).warning(_PLAINTEXT_BANNER.format(endpoint=endpoint))
    return True
