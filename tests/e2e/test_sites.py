"""Sites and jobs end to end: three `meshsl site start` processes (the lab hosts the broker), a submitter
using the Python API, policies that refuse, an operator who approves, abort, a site killed and restarted,
tampered kits and unsigned jobs. Real processes, real CURVE-secured ZeroMQ sockets on loopback."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from meshsl.errors import JobRefused
from support.sites_project import SITES, Project

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def project(tmp_path):
    project = Project(tmp_path)
    project.start_all()
    yield project
    project.stop_all()


def _saved(folder: Path) -> dict:
    return {f"{p.parent.name}/{p.name}:{k}": v for p in sorted(folder.rglob("*.safetensors"))
            for k, v in load_file(p).items()}


def _operator(project: Project, site: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "meshsl", "site", *args, "--state", str(project.state(site))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _wait_for(client, job: str, predicate, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = client.status(job)
        if predicate(view):
            return view
        time.sleep(0.2)  # polling the broker's board (the API's own wait polls the same way)
    raise AssertionError(f"job {job} never reached the expected state: {view}")


def test_refused_by_a_site_policy_then_approved_by_its_operator_and_trained(project):
    project.stop_all()
    project.set_policy("hospital_a", approval="operator")
    project.start_all()
    with project.client() as client:
        refused = client.submit(project.job(allowed=False), name="all columns")
        with pytest.raises(JobRefused) as caught:
            client.wait(refused, timeout_s=60)
        assert set(caught.value.reasons) == {"hospital_b"}
        assert "'worst area'" in caught.value.reasons["hospital_b"] and "forbid" in caught.value.reasons["hospital_b"]

        job = client.submit(project.job(), name="without worst area")
        view = _wait_for(client, job, lambda v: v["sites"]["hospital_a"]["decision"] == "wait")
        assert view["state"] == "reviewing"
        assert "waiting" in _operator(project, "hospital_a", "jobs")
        assert f"job {job} approved" in _operator(project, "hospital_a", "approve", job)
        final = client.wait(job, timeout_s=180)
    assert final["state"] == "finished"
    accuracy = final["sites"]["lab"]["summary"]["lab"]["tasks"]["cancer"]["eval"]["accuracy"]
    assert accuracy > 0.85
    # each party's trained weights lie on its own site only
    owned = {"lab": {"classifier"}, "hospital_a": {"encoder_a"}, "hospital_b": {"encoder_b"}}
    for site in SITES:
        found = {p.stem for p in project.state(site).rglob("*.safetensors")}
        assert found == owned[site], (site, found)


def test_abort_stops_the_job_on_every_site_within_ten_seconds(project):
    with project.client() as client:
        job = client.submit(project.job(epochs=400), name="long")
        _wait_for(client, job, lambda v: v["state"] == "running" and
                  any("step" in line for line in v["sites"]["lab"]["logs"]), timeout_s=90)
        nodes = {site: project.node_pids(site) for site in SITES}
        assert all(nodes.values()), nodes
        started = time.monotonic()
        client.abort(job)
        view = _wait_for(client, job, lambda v: all(p["state"] == "aborted" for p in v["sites"].values()),
                         timeout_s=10)
        took = time.monotonic() - started
    assert view["state"] == "aborted" and took < 10.0
    for site, pids in nodes.items():
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), site


def test_a_site_killed_mid_job_and_restarted_finishes_with_identical_weights(project):
    with project.client() as client:
        undisturbed = client.submit(project.job(epochs=30), name="undisturbed")
        client.wait(undisturbed, timeout_s=180)
        job = client.submit(project.job(epochs=30), name="disturbed")
        _wait_for(client, job, lambda v: _last_step(v) >= 40, timeout_s=90)
        project.kill("hospital_a")
        project.start("hospital_a")
        final = client.wait(job, timeout_s=240)
    assert final["state"] == "finished"
    for site in SITES:
        got, want = _saved(project.weights(site, job)), _saved(project.weights(site, undisturbed))
        assert got.keys() == want.keys() and got
        for key in want:
            assert (got[key] == want[key]).all(), (site, key)
    log = (project.state("hospital_a") / "jobs" / job / "logs" / "hospital_a.log").read_text()
    assert "resumed from checkpoint" in log


def _last_step(view: dict) -> int:
    steps = [int(m.group(1)) for line in view["sites"]["lab"]["logs"] for m in [re.search(r"step (\d+):", line)] if m]
    return max(steps, default=-1)


def test_a_tampered_kit_is_refused_at_start(tmp_path):
    project = Project(tmp_path)
    kit = project.kits["hospital_b"]
    site = json.loads((kit / "site.json").read_text())
    site["broker"]["endpoint"] = "tcp://198.51.100.7:7100"  # an attacker's broker
    (kit / "site.json").write_text(json.dumps(site))
    done = subprocess.run(project.command("hospital_b"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "site.json was changed after provisioning" in done.stderr and "Traceback" not in done.stderr


def test_unsigned_and_forged_jobs_are_refused(project):
    with project.client() as client:
        with pytest.raises(JobRefused, match="not signed"):
            client.submit(project.job(), sign=False)
        forged = client.identity.sign({"something": "else"})
        from meshsl.apps.sites import messages as m
        from meshsl.apps.sites.specs import JobDocument
        document = JobDocument(id="0123456789abcdef", name="forged", topology=project.job(), submitter="alice",
                               submitted_at=time.time(), signature=forged)
        with pytest.raises(JobRefused, match="does not verify"):
            client._ask(m.Submit(job=document))
        client.sock.send(b"\x00garbage")  # a peer's garbage: answered with an error, never fatal
        assert client.sock.poll(10_000)
        reply = m.decode(client.sock.recv())
        assert not reply.ok and "malformed" in reply.error
        # the broker refused all three and still serves: a signed job goes through
        job = client.submit(project.job(), name="signed")
        assert client.wait(job, timeout_s=180)["state"] == "finished"
