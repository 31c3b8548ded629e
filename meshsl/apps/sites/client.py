"""Submitting jobs: `meshsl submit` and `meshsl.apps.sites.client.JobClient` (the Python API). A job is the
topology sealed for the project (each node's CURVE key is its party's site key) and signed by the
submitter; the broker and every site verify the signature."""
from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Optional

import yaml
import zmq

from meshsl.config.loader import load_yaml
from meshsl.errors import ConfigError, JobFailed, JobRefused, PeerTimeout
from meshsl.apps.sites import messages as m
from meshsl.apps.sites.identity import Identity, load_identity
from meshsl.apps.sites.kit import Kit, verify_kit
from meshsl.apps.sites.links import dial
from meshsl.apps.sites.specs import JobDocument


def seal(topology_text: str, kit: Kit, source: str) -> str:
    """The topology with every node's public key set to its party's site key, CURVE on, keys in `keys/`."""
    document = load_yaml(topology_text, source)
    if not isinstance(document, dict) or not isinstance(document.get("nodes"), list):
        raise ConfigError("a job's topology needs a `nodes:` list", source)
    for index, node in enumerate(document["nodes"]):
        site = kit.site_of_party(str(node.get("party"))) if isinstance(node, dict) else None
        if site is None:
            raise ConfigError(f"no site of project {kit.project} runs party {node.get('party')!r}",
                              f"{source}: nodes[{index}].party")
        node["public_key"] = site.identity.curve_public
    document["security"] = {**(document.get("security") or {}), "curve": True, "keys_dir": "keys"}
    return yaml.safe_dump(document, sort_keys=False)


class JobClient:
    """Talks to the project's broker as one submitter. `kit`: any site's kit of the project (public data);
    `identity`: the submitter's own folder (`meshsl site init --submitter`)."""

    def __init__(self, kit: Path | Kit, identity_dir: Path, name: str, timeout_s: float = 20.0,
                 broker: Optional[str] = None) -> None:
        self.kit = kit if isinstance(kit, Kit) else verify_kit(Path(kit))
        self.identity: Identity = load_identity(Path(identity_dir), name)
        self.timeout_s = timeout_s
        self.ctx = zmq.Context()
        self.endpoint = broker or self.kit.broker_endpoint  # `broker`: another route to it (NAT, a published port)
        self.sock = dial(self.ctx, self.identity, self.kit.broker_identity, self.endpoint)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()

    def __enter__(self) -> "JobClient":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def _ask(self, message) -> dict:
        self.sock.send(m.encode(message))
        if not self.sock.poll(int(self.timeout_s * 1000)):
            raise PeerTimeout(f"broker {self.endpoint}", self.timeout_s)
        reply = m.decode(self.sock.recv(), "broker")
        if not isinstance(reply, m.Reply):
            raise ConfigError(f"the broker answered {reply.type}, not a reply")
        if not reply.ok:
            job = message.job.id if isinstance(message, m.Submit) else message.job
            raise JobRefused(job, {"broker": reply.error})
        return reply.job

    def submit(self, topology: Path | str, name: Optional[str] = None, sign: bool = True) -> str:
        """Submit the topology (a file, or YAML text); returns the job id. Unsigned jobs are refused."""
        path = Path(topology) if isinstance(topology, Path) or "\n" not in str(topology) else None
        text = path.read_text() if path else str(topology)
        source = str(path) if path else "<topology>"
        document = JobDocument(id=uuid.uuid4().hex[:16], name=name or (path.stem if path else "job"),
                               topology=seal(text, self.kit, source), submitter=self.identity.name,
                               submitted_at=time.time())
        if sign:
            document = document.model_copy(update={"signature": self.identity.sign(document.signed_part())})
        self._ask(m.Submit(job=document))
        return document.id

    def status(self, job: str) -> dict:
        return self._ask(m.Query(job=job))

    def abort(self, job: str) -> dict:
        return self._ask(m.Abort(job=job, submitter=self.identity.name,
                                 signature=self.identity.sign({"abort": job})))

    def wait(self, job: str, timeout_s: float = 600.0, states: tuple[str, ...] = ("finished",)) -> dict:
        """Until the job reaches one of `states` (JobRefused / JobFailed when it ends otherwise)."""
        deadline = time.monotonic() + timeout_s
        while True:
            view = self.status(job)
            if view["state"] in states:
                return view
            if view["state"] == "refused":
                raise JobRefused(job, {s: p["reason"] for s, p in view["sites"].items() if p["decision"] == "refuse"})
            if view["state"] in ("failed", "aborted"):
                raise JobFailed(job, view["state"], {s: p["detail"] for s, p in view["sites"].items() if p["detail"]}
                                or {"broker": view["reason"]})
            if time.monotonic() > deadline:
                raise PeerTimeout(f"job {job}", timeout_s, f"reach {'/'.join(states)} (it is {view['state']})")
            time.sleep(0.25)  # polling the broker's board; the job runs elsewhere
