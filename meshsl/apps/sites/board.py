"""The broker's job board: every job's state and each site's part in it. I/O-free: events in, (site, message)
instructions out; the broker shell (meshsl.apps.sites.broker) verifies signatures and does the sending."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from meshsl.config.loader import load_yaml, parse_spec
from meshsl.errors import ConfigError
from meshsl.apps.sites.messages import Decision, Offer, Start, Status, Stop
from meshsl.apps.sites.specs import JobDocument

Instruction = tuple[str, object]  # (site, message)
FINAL = ("refused", "finished", "failed", "aborted")


@dataclass
class SitePart:
    decision: str = "pending"  # pending | approve | refuse | wait
    reason: str = ""
    state: str = "idle"  # idle | running | finished | failed | aborted
    detail: str = ""
    logs: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


@dataclass
class JobRecord:
    document: JobDocument
    parts: dict[str, SitePart]
    state: str = "reviewing"  # reviewing | running | refused | finished | failed | aborted
    reason: str = ""
    updated: float = field(default_factory=time.time)

    def view(self) -> dict:
        return {"id": self.document.id, "name": self.document.name, "submitter": self.document.submitter,
                "state": self.state, "reason": self.reason,
                "sites": {name: vars(part) for name, part in self.parts.items()}}


class JobBoard:
    def __init__(self, site_parties: dict[str, str]) -> None:
        self.site_of = {party: site for site, party in site_parties.items()}
        self.jobs: dict[str, JobRecord] = {}
        self.online: set[str] = set()

    def submit(self, document: JobDocument) -> list[Instruction]:
        """Raises ConfigError when the job cannot be placed (bad YAML, a party without a site)."""
        if document.id in self.jobs:
            raise ConfigError(f"job id {document.id} was already submitted", "job.id")
        spec = parse_spec(load_yaml(document.topology, f"job {document.id}"), f"job {document.id}")
        parties = sorted({n.party for n in spec.nodes})
        missing = [p for p in parties if p not in self.site_of]
        if missing:
            raise ConfigError(f"no site of this project runs party(ies) {missing} (sites' parties: "
                              f"{sorted(self.site_of)})", f"job {document.id}: nodes")
        record = JobRecord(document, {self.site_of[p]: SitePart() for p in parties})
        self.jobs[document.id] = record
        return [(site, Offer(job=document)) for site in record.parts if site in self.online]

    def connected(self, site: str) -> list[Instruction]:
        """A site (re)registered: offer what it has not decided, start again what it had running."""
        self.online.add(site)
        out: list[Instruction] = []
        for record in self.jobs.values():
            part = record.parts.get(site)
            if part is None or record.state in FINAL:
                continue
            if record.state == "reviewing" and part.decision in ("pending", "wait"):
                out.append((site, Offer(job=record.document)))
            elif record.state == "running" and part.state not in ("finished",):
                out.append((site, Start(job=record.document.id)))
        return out

    def decided(self, site: str, decision: Decision) -> list[Instruction]:
        record, part = self._part(site, decision.job)
        if record is None or record.state != "reviewing":
            return []
        part.decision, part.reason = decision.verdict, decision.reason
        if decision.verdict == "refuse":
            return self._end(record, "refused", f"{site}: {decision.reason}")
        if all(p.decision == "approve" for p in record.parts.values()):
            record.state = "running"
            return [(s, Start(job=record.document.id)) for s in record.parts]
        return []

    def reported(self, site: str, status: Status) -> list[Instruction]:
        record, part = self._part(site, status.job)
        if record is None:
            return []
        part.state, part.detail = status.state, status.detail
        part.logs, part.summary = status.logs, status.summary
        record.updated = time.time()
        if record.state != "running":
            return []
        if status.state == "failed":
            return self._end(record, "failed", f"{site}: {status.detail}")
        if all(p.state == "finished" for p in record.parts.values()):
            record.state = "finished"
        return []

    def abort(self, job: str, reason: str) -> list[Instruction]:
        record = self.jobs.get(job)
        if record is None or record.state in FINAL:
            return []
        return self._end(record, "aborted", reason)

    def _end(self, record: JobRecord, state: str, reason: str) -> list[Instruction]:
        record.state, record.reason, record.updated = state, reason, time.time()
        return [(s, Stop(job=record.document.id, state=state, reason=reason)) for s in record.parts]

    def _part(self, site: str, job: str) -> tuple[JobRecord | None, SitePart]:
        record = self.jobs.get(job)
        part = record.parts.get(site) if record else None
        return (record, part) if part is not None else (None, SitePart())
