"""`meshsl site start`: the long-running agent of one site. It dials out to the broker, reviews each offered
job against the site's policy (refuse with the reason, approve, or wait for the operator), runs the site's
own nodes of approved jobs, reports their state, and stops them when the job is aborted."""
from __future__ import annotations

from typing import Any, Optional, cast

import asyncio
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.asyncio

from meshsl.data.catalogue import read_catalogue
from meshsl.errors import MeshslError, ProtocolError
from meshsl.apps.sites import messages as m
from meshsl.apps.sites.identity import Identity, verify
from meshsl.apps.sites.kit import Kit
from meshsl.apps.sites.links import dial
from meshsl.apps.sites.node_processes import JobNodes
from meshsl.apps.sites.review import job_topology, review
from meshsl.apps.sites.specs import JobDocument, PolicySpec

log = logging.getLogger("meshsl.site")
REPORT_EVERY_S = 2.0


@dataclass
class LocalJob:
    document: JobDocument
    folder: Path
    state: str = "offered"  # offered | waiting | refused | approved | running | finished | failed | aborted
    reason: str = ""
    nodes: JobNodes | None = None
    ours: dict[str, str | None] = field(default_factory=dict)  # this site's nodes -> their endpoints
    started: float = 0.0
    watcher: asyncio.Task | None = None

    def save(self) -> None:
        (self.folder / "state.json").write_text(json.dumps({"state": self.state, "reason": self.reason}) + "\n")


class SiteAgent:
    def __init__(self, kit: Kit, identity: Identity, state: Path, policy: PolicySpec, catalogue: Path | None) -> None:
        self.kit, self.identity, self.policy = kit, identity, policy
        self.state, self.catalogue = Path(state).resolve(), catalogue.resolve() if catalogue else None
        self.jobs: dict[str, LocalJob] = {}
        self._sock: Optional[zmq.asyncio.Socket] = None

    async def run(self, stop: asyncio.Event) -> None:
        ctx = zmq.asyncio.Context()
        self._sock = cast(zmq.asyncio.Socket, dial(ctx, self.identity, self.kit.broker_identity,
                                                   self.kit.broker_endpoint))  # an asyncio context's socket
        control = ctx.socket(zmq.ROUTER)
        control.bind(f"ipc://{self.state / 'control.sock'}")
        await self._register()
        log.info("site %s (party %s) dialled the broker at %s", self.kit.site.name, self.kit.site.party,
                 self.kit.broker_endpoint)
        loops = [asyncio.ensure_future(c) for c in (self._from_broker(), self._from_operator(control),
                                                     self._report(), stop.wait())]
        try:
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if error is not None:
                    raise error
        finally:
            for task in loops:
                task.cancel()
            for job in self.jobs.values():
                if job.nodes is not None:
                    await job.nodes.stop()
            control.close(0)
            self.sock.close(0)
            self._sock = None
            ctx.term()

    @property
    def sock(self) -> zmq.asyncio.Socket:
        """The connection to the broker, while `run` runs."""
        if self._sock is None:
            raise RuntimeError("the site agent talks to the broker only while it runs")
        return self._sock

    async def _send(self, message) -> None:
        await self.sock.send(m.encode(message))

    async def _register(self) -> None:
        now = time.time()
        await self._send(m.Register(site=self.kit.site.name, time=now,
                                    signature=self.identity.sign({"site": self.kit.site.name, "time": now})))

    async def _from_broker(self) -> None:
        while True:
            frame = await self.sock.recv()
            try:
                message = m.decode(frame, "broker")
            except ProtocolError as exc:
                log.warning("ignored a message: %s", exc)
                continue
            if isinstance(message, m.Offer):
                await self._offered(message.job)
            elif isinstance(message, m.Start):
                await self._start(message.job)
            elif isinstance(message, m.Stop):
                await self._stop(message.job, message.state, message.reason)
            elif isinstance(message, m.Reply) and not message.ok:
                log.warning("broker: %s", message.error)
                if "unregistered" in message.error:
                    await self._register()

    async def _offered(self, document: JobDocument) -> None:
        folder = self.state / "jobs" / document.id
        folder.mkdir(parents=True, exist_ok=True)
        job = self.jobs.get(document.id) or LocalJob(document, folder)
        self.jobs[document.id] = job
        reasons = await asyncio.to_thread(self._review, job)
        if reasons:
            job.state, job.reason = "refused", "; ".join(reasons)
        else:
            job.state = "approved" if self.policy.approval == "auto" else "waiting"
        job.save()
        log.info("job %s (%s from %s): %s %s", document.id, document.name, document.submitter, job.state, job.reason)
        verdict = {"refused": "refuse", "approved": "approve", "waiting": "wait"}[job.state]
        await self._send(m.Decision(job=document.id, verdict=verdict, reason=job.reason))

    def _review(self, job: LocalJob) -> list[str]:
        document = job.document
        submitter = self.kit.submitters.get(document.submitter)
        if submitter is None:
            return [f"unknown submitter {document.submitter!r}"]
        try:
            verify(document.signed_part(), document.signature, submitter, f"job {document.id}")
            (job.folder / "job.json").write_text(document.model_dump_json(indent=2))
            (job.folder / "topology.yaml").write_text(document.topology)
            topology = job_topology(document, job.folder)
            catalogue = read_catalogue(self.catalogue) if self.catalogue else {}
            reasons = review(document, topology, self.kit, self.policy, catalogue)
        except MeshslError as exc:
            return [str(exc)]
        job.ours = {n: spec.endpoint for n, spec in topology.nodes.items() if spec.party == self.kit.site.party}
        if topology.spec.security.curve:
            self._node_keys(job)
        return reasons

    def _node_keys(self, job: LocalJob) -> None:
        keys = job.folder / "keys"
        keys.mkdir(exist_ok=True, mode=0o700)
        for name in job.ours:  # every node of this site holds the site's own CURVE key
            shutil.copyfile(self.identity.directory / f"{self.identity.name}.key_secret", keys / f"{name}.key_secret")
            (keys / f"{name}.key_secret").chmod(0o600)

    async def approve(self, job_id: str, approve: bool, reason: str) -> str:
        job = self.jobs.get(job_id)
        if job is None or job.state != "waiting":
            return f"job {job_id} is not waiting for approval" + (f" (it is {job.state})" if job else "")
        job.state, job.reason = ("approved", "") if approve else ("refused", reason or "refused by the operator")
        job.save()
        await self._send(m.Decision(job=job_id, verdict="approve" if approve else "refuse", reason=job.reason))
        return f"job {job_id} {job.state}"

    async def _start(self, job_id: str) -> None:
        job = self.jobs.get(job_id) or self._reload(job_id)
        if job is None or (job.watcher is not None and not job.watcher.done()):
            return
        job.state, job.started = "running", time.time()
        job.nodes = JobNodes(job.folder, self.catalogue, dict(job.ours))
        running = [name for name in job.ours if not job.nodes.finished(name)]
        if not running:  # restarted after its nodes ended well, before it could say so
            job.state = "finished"
        job.save()
        for name in running:
            await job.nodes.start(name)
        job.watcher = asyncio.ensure_future(self._watch(job, running))
        await self._status(job)

    def _reload(self, job_id: str) -> LocalJob | None:
        """A job this site approved before it restarted: its document and review are on disk."""
        folder = self.state / "jobs" / job_id
        try:
            document = JobDocument.model_validate_json((folder / "job.json").read_text())
        except (OSError, ValueError):
            return None
        job = LocalJob(document, folder)
        if self._review(job):
            return None
        self.jobs[job_id] = job
        return job

    async def _watch(self, job: LocalJob, running: list[str]) -> None:
        assert job.nodes is not None
        if not running:
            return
        waits = [asyncio.ensure_future(job.nodes.wait(n)) for n in running]
        done, pending = await asyncio.wait(waits, timeout=self.policy.max_runtime_s)
        if pending:
            await job.nodes.stop()
            job.state, job.reason = "failed", f"ran past this site's max_runtime_s {self.policy.max_runtime_s:g}"
        elif job.state == "running":
            failed = {n: job.nodes.nodes[n].exit_code for n in running if job.nodes.nodes[n].exit_code}
            job.state = "failed" if failed else "finished"
            job.reason = f"node(s) exited with {failed}" if failed else ""
        job.save()
        await self._status(job)

    async def _stop(self, job_id: str, state: str, reason: str) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            return
        if job.state in ("running", "waiting", "approved", "offered"):
            job.state, job.reason = state, f"job {state}: {reason}"
            job.save()
        if job.nodes is not None:
            await job.nodes.stop()
        await self._status(job)

    async def _status(self, job: LocalJob) -> None:
        if job.state not in ("running", "finished", "failed", "aborted"):
            return
        logs = job.nodes.log_tail() if job.nodes and "logs" in self.policy.release else []
        summary = job.nodes.summary() if job.nodes and "metrics" in self.policy.release else {}
        await self._send(m.Status(job=job.document.id, state=job.state, detail=job.reason, logs=logs, summary=summary))

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY_S)  # a heartbeat and progress, not synchronisation
            await self._send(m.Ping())
            for job in list(self.jobs.values()):
                if job.state == "running":
                    await self._status(job)

    async def _from_operator(self, control: zmq.asyncio.Socket) -> None:
        while True:
            route, payload = (await control.recv_multipart())[:2]
            try:
                request = json.loads(payload)
                answer: dict[str, Any]
                if request.get("command") == "jobs":
                    answer = {j: {"state": v.state, "reason": v.reason, "name": v.document.name,
                                  "submitter": v.document.submitter} for j, v in self.jobs.items()}
                else:
                    answer = {"message": await self.approve(str(request.get("job")), request.get("command") == "approve",
                                                            str(request.get("reason", "")))}
            except (ValueError, AttributeError) as exc:
                answer = {"message": f"bad request: {exc}"}
            await control.send_multipart([route, json.dumps(answer).encode()])
