"""The broker: a ROUTER that sites dial out to and submitters call. It verifies every signature, feeds the
job board (meshsl.apps.sites.board) and sends the board's instructions. A peer's garbage is logged and refused,
never fatal."""
from __future__ import annotations

import asyncio
import logging
import time

import zmq
import zmq.asyncio

from meshsl.errors import ConfigError, MeshslError, ProtocolError
from meshsl.apps.sites import messages as m
from meshsl.apps.sites.board import JobBoard
from meshsl.apps.sites.identity import Identity, verify
from meshsl.apps.sites.kit import Kit
from meshsl.apps.sites.links import broker_socket

log = logging.getLogger("meshsl.broker")
CLOCK_SKEW_S = 300.0


class Broker:
    def __init__(self, kit: Kit, identity: Identity) -> None:
        self.kit = kit
        self.identity = identity
        self.board = JobBoard({s.name: s.party for s in kit.sites.values()})
        self.routes: dict[str, bytes] = {}  # site -> ROUTER identity of its current connection
        self.sock: zmq.asyncio.Socket | None = None
        self._outbox: list = []  # the board's instructions from the message being handled

    async def serve(self, stop: asyncio.Event) -> None:
        ctx = zmq.asyncio.Context()
        allowed = [s.identity for s in self.kit.sites.values()] + list(self.kit.submitters.values())
        self.sock, auth = await broker_socket(ctx, self.identity, allowed, self.kit.broker_bind)
        log.info("broker of project %s listening on %s", self.kit.project, self.kit.broker_bind)
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                receiving = asyncio.ensure_future(self.sock.recv_multipart())
                done, _ = await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if receiving not in done:
                    receiving.cancel()
                    break
                frames = receiving.result()
                if len(frames) == 2:
                    await self._handle(frames[0], frames[1])
        finally:
            stopping.cancel()
            auth.stop()
            self.sock.close(0)
            ctx.term()

    async def _handle(self, route: bytes, payload: bytes) -> None:
        site = next((s for s, r in self.routes.items() if r == route), None)
        try:
            message = m.decode(payload, site or "a client")
            reply = self._dispatch(route, site, message)
        except (ProtocolError, ConfigError) as exc:
            log.warning("refused a message: %s", exc)
            reply = m.Reply(ok=False, error=str(exc))
        sock = self.sock
        if sock is None:
            raise RuntimeError("the broker handles messages only once its socket is open")
        if reply is not None:
            await sock.send_multipart([route, m.encode(reply)])
        for target, instruction in self._outbox:
            if target in self.routes:
                await sock.send_multipart([self.routes[target], m.encode(instruction)])
        self._outbox = []

    def _dispatch(self, route: bytes, site: str | None, message) -> m.Reply | None:
        if isinstance(message, m.Register):
            self._register(route, message)
            return None
        if isinstance(message, (m.Decision, m.Status, m.Ping)):
            if site is None:
                raise ProtocolError("unregistered", f"{message.type} before register")
            if isinstance(message, m.Decision):
                self._outbox = self.board.decided(site, message)
            elif isinstance(message, m.Status):
                self._outbox = self.board.reported(site, message)
            return None
        if isinstance(message, m.Submit):
            return self._submit(message)
        if isinstance(message, m.Query):
            record = self.board.jobs.get(message.job)
            return m.Reply(ok=record is not None, error="" if record else f"no job {message.job}",
                           job=record.view() if record else {})
        if isinstance(message, m.Abort):
            return self._abort(message)
        raise ProtocolError("unexpected", f"{message.type} is not sent to a broker")

    def _register(self, route: bytes, message: m.Register) -> None:
        entry = self.kit.sites.get(message.site)
        if entry is None:
            raise ProtocolError("unknown_site", message.site)
        verify({"site": message.site, "time": message.time}, message.signature, entry.identity,
               f"register of site {message.site}")
        if abs(time.time() - message.time) > CLOCK_SKEW_S:
            raise ProtocolError("stale_register", f"site {message.site}: clock off by more than {CLOCK_SKEW_S:.0f} s")
        self.routes[message.site] = route
        log.info("site %s connected", message.site)
        self._outbox = self.board.connected(message.site)

    def _submit(self, message: m.Submit) -> m.Reply:
        job = message.job
        submitter = self.kit.submitters.get(job.submitter)
        if submitter is None:
            return m.Reply(ok=False, error=f"job {job.id}: unknown submitter {job.submitter!r} (this project's "
                                           f"submitters: {sorted(self.kit.submitters)})")
        try:
            verify(job.signed_part(), job.signature, submitter, f"job {job.id}")
            self._outbox = self.board.submit(job)
        except MeshslError as exc:
            return m.Reply(ok=False, error=str(exc))
        log.info("job %s (%s) submitted by %s", job.id, job.name, job.submitter)
        return m.Reply(ok=True, job=self.board.jobs[job.id].view())

    def _abort(self, message: m.Abort) -> m.Reply:
        record = self.board.jobs.get(message.job)
        submitter = self.kit.submitters.get(message.submitter)
        if record is None or submitter is None:
            return m.Reply(ok=False, error=f"no job {message.job} of submitter {message.submitter}")
        try:
            verify({"abort": message.job}, message.signature, submitter, f"abort of job {message.job}")
        except MeshslError as exc:
            return m.Reply(ok=False, error=str(exc))
        if record.document.submitter != message.submitter:
            return m.Reply(ok=False, error=f"job {message.job} was submitted by {record.document.submitter}")
        self._outbox = self.board.abort(message.job, f"aborted by {message.submitter}")
        return m.Reply(ok=True, job=record.view())
