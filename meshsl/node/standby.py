"""A warm standby's wait (`meshsl node --standby`, docs/failover.md): already started and built, it
waits for its supervisor's `takeover` line on stdin, then for the dead primary's endpoint to be free."""
from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from typing import Optional
from urllib.parse import urlsplit

from meshsl.errors import MeshslError

log = logging.getLogger("meshsl.node")

TAKEOVER = "takeover"


async def wait_for_takeover(node: str) -> bool:
    """True on a `takeover` line; False at end of input (the supervisor is gone or the run is over)."""
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)  # (a thread: stdin may be a pipe or a tty)
        if not line:
            log.info("%s: standby not needed", node)
            return False
        if line.strip() == TAKEOVER:
            return True


async def wait_until_free(node: str, endpoint: Optional[str], timeout_s: float) -> None:
    """Poll until a listener can bind `endpoint` (the primary's socket is gone: at once after SIGKILL)."""
    started = time.monotonic()
    while endpoint and not endpoint_free(endpoint):
        if time.monotonic() - started > timeout_s:
            raise MeshslError(f"standby of {node!r}: {endpoint} still in use after {timeout_s:.0f}s "
                              f"(is the primary still running?)")
        await asyncio.sleep(0.01)


def endpoint_free(endpoint: str) -> bool:
    """Can a listener bind this tcp:// endpoint now? Other transports: yes."""
    if not endpoint.startswith("tcp://"):
        return True
    parts = urlsplit(endpoint)
    host = "" if parts.hostname in (None, "*") else parts.hostname
    try:
        family = socket.getaddrinfo(host or None, parts.port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq does: TIME_WAIT is no owner
            probe.bind((host, parts.port))
            probe.listen(1)
    except OSError:
        return False
    return True
