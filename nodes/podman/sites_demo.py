"""From `meshsl provision` to a trained model, with every site in its own podman container started from its
kit, one of them (hospital_b) behind a firewall that drops every inbound connection. Checks, in order:

  1. a job that reads a column hospital_b's policy forbids is refused with hospital_b's reason;
  2. the job resubmitted without it is approved and trains to the end; each party's weights lie only in
     its own site's state;
  3. a site container killed mid-job and started again finishes the job with weights bit-identical to (2);
  4. `abort` ends a long job on every site within 10 s;
  5. a tampered kit and an unsigned job are refused, with clear messages.

    python nodes/podman/sites_demo.py [--image localhost/meshsl:latest] [--out DIR]

Runs as root on the host (podman, podman-compose, nsenter, nft); the submitter is this Python process.
CI: .ci/run (the container tier). Writes DIR/report.json and exits 1 when a check fails."""
from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "sites"))
import setup_project  # noqa: E402

from meshsl.errors import JobRefused  # noqa: E402
from meshsl.apps.sites.client import JobClient  # noqa: E402

PROJECT = "meshsl-sites-demo"
COMPOSE = (sys.executable, "-m", "podman_compose")  # podman-compose 1.6 (PyPI), from this environment
FIREWALL = """table inet meshsl_fw {
  chain input {
    type filter hook input priority 0; policy accept;
    iif lo accept
    ct state established,related accept
    meta l4proto tcp drop
  }
}
"""


def sh(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("text", True)
    return subprocess.run(list(args), check=check, capture_output=True, **kw)


def compose_file(out: Path, image: str, broker_port: int) -> Path:
    """One compose file for the three sites on this host: each service as its kit's compose.yaml defines it,
    with the kit's relative volumes made absolute."""
    services = {}
    for site in setup_project.SITES:
        kit = out / "kits" / site
        service = yaml.safe_load((kit / "compose.yaml").read_text())["services"][site]
        service["image"] = image
        service["volumes"] = [f"{kit}:/kit:ro", f"{out / 'sites' / site / 'state'}:/var/lib/meshsl",
                              f"{out / 'sites' / site / 'data'}:/data:ro"]
        service["restart"] = "no"  # the demo restarts the killed site itself
        if "ports" in service:
            service["ports"] = [f"127.0.0.1:{broker_port}:7100"]
        services[site] = service
    path = out / "compose.yaml"
    path.write_text(yaml.safe_dump({"services": services}, sort_keys=False))
    return path


def container(site: str) -> str:
    return sh("podman", "ps", "-a", "--filter", f"label=com.docker.compose.service={site}",
              "--filter", f"label=io.podman.compose.project={PROJECT}", "--format", "{{.Names}}").stdout.split()[0]


def firewall(site: str) -> None:
    pid = sh("podman", "inspect", "-f", "{{.State.Pid}}", container(site)).stdout.strip()
    sh("nsenter", "-t", pid, "-n", "nft", "-f", "-", input=FIREWALL)


def inbound_dropped(target: str) -> bool:
    """A connection from the lab's container to `target` times out (dropped), rather than being refused."""
    probe = ("import socket\ntry:\n socket.create_connection(('%s', 7999), timeout=3)\nexcept TimeoutError:\n"
             " print('dropped')\nexcept OSError as e:\n print('answered', e)\n" % target)
    return sh("podman", "exec", container("lab"), "python3", "-c", probe, check=False).stdout.strip() == "dropped"


def weights(out: Path, site: str, job: str) -> dict:
    folder = out / "sites" / site / "state" / "jobs" / job / "weights"
    return {f"{p.parent.name}/{p.name}:{k}": v for p in sorted(folder.rglob("*.safetensors"))
            for k, v in load_file(p).items()}


def last_step(view: dict) -> int:
    steps = [int(m.group(1)) for line in view["sites"]["lab"]["logs"] for m in [re.search(r"step (\d+):", line)] if m]
    return max(steps, default=-1)


def wait_for(client: JobClient, job: str, predicate, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        view = client.status(job)
        if predicate(view) or time.monotonic() > deadline:
            return view
        time.sleep(0.25)  # polling the broker's board


def run(out: Path, image: str, report: dict) -> None:
    with socket.socket() as probe:  # a free port on this host for the broker's published port
        probe.bind(("127.0.0.1", 0))
        broker_port = probe.getsockname()[1]
    kits = setup_project.make_project(out, "tcp://lab:7100", "tcp://lab:7003")
    for site in setup_project.SITES:  # the image runs as user 65534: the site's state is its own
        sh("chown", "-R", "65534:65534", str(out / "sites" / site / "state"))
    compose = compose_file(out, image, broker_port)
    sh(*COMPOSE, "-p", PROJECT, "-f", str(compose), "up", "-d")
    firewall("hospital_b")
    report["hospital_b_drops_inbound"] = inbound_dropped("hospital_b")
    client = JobClient(kits["lab"], out / "alice", "alice", broker=f"tcp://127.0.0.1:{broker_port}", timeout_s=60)
    job_text = (out / "job.yaml").read_text()
    refused = client.submit(job_text, name="all columns")
    try:
        client.wait(refused, timeout_s=120)
        report["refused_by_policy"] = "not refused"
    except JobRefused as exc:
        report["refused_by_policy"] = exc.reasons
    allowed = setup_project.without_forbidden_column(job_text)
    longer = yaml.safe_load(allowed)
    longer["training"]["epochs"] = 40  # long enough (600 steps) to kill a site mid-job
    allowed = yaml.safe_dump(longer, sort_keys=False)
    started = time.monotonic()
    job = client.submit(allowed, name="without worst area")
    view = client.wait(job, timeout_s=600)
    report["trained"] = view["state"]
    report["held_out_accuracy"] = view["sites"]["lab"]["summary"]["lab"]["tasks"]["cancer"]["eval"]["accuracy"]
    report["train_seconds"] = round(time.monotonic() - started, 1)
    owned = {"lab": {"classifier"}, "hospital_a": {"encoder_a"}, "hospital_b": {"encoder_b"}}
    report["weights_only_at_their_owner"] = all(
        {p.stem for p in (out / "sites" / s / "state").rglob("*.safetensors")} == owned[s] for s in owned)

    disturbed = client.submit(allowed, name="a site killed mid-job")
    wait_for(client, disturbed, lambda v: last_step(v) >= 60, 300)
    victim = container("hospital_a")
    sh("podman", "kill", victim)
    sh("podman", "start", victim)
    report["killed_site_job"] = client.wait(disturbed, timeout_s=600)["state"]
    log = out / "sites" / "hospital_a" / "state" / "jobs" / disturbed / "logs" / "hospital_a.log"
    report["killed_site_resumed_from_a_checkpoint"] = "resumed from checkpoint" in log.read_text()
    report["killed_site_identical_weights"] = all(
        (lambda got, want: got.keys() == want.keys() and bool(want) and all((got[k] == want[k]).all() for k in want))(
            weights(out, s, disturbed), weights(out, s, job)) for s in setup_project.SITES)

    long = yaml.safe_load(allowed)
    long["training"]["epochs"] = 400
    aborted = client.submit(yaml.safe_dump(long, sort_keys=False), name="to abort")
    wait_for(client, aborted, lambda v: last_step(v) >= 5, 300)
    began = time.monotonic()
    client.abort(aborted)
    view = wait_for(client, aborted, lambda v: all(p["state"] == "aborted" for p in v["sites"].values()), 10)
    report["abort_seconds"] = round(time.monotonic() - began, 2)
    report["aborted_everywhere"] = all(p["state"] == "aborted" for p in view["sites"].values())

    try:
        client.submit(allowed, name="unsigned", sign=False)
        report["unsigned_refused"] = "accepted"
    except JobRefused as exc:
        report["unsigned_refused"] = exc.reasons.get("broker", str(exc))
    tampered = out / "tampered-kit"
    shutil.copytree(kits["hospital_a"], tampered)
    site = json.loads((tampered / "site.json").read_text())
    site["broker"]["endpoint"] = "tcp://198.51.100.7:7100"
    (tampered / "site.json").write_text(json.dumps(site))
    done = sh("podman", "run", "--rm", "-v", f"{tampered}:/kit:ro", image, "site", "start", "--kit", "/kit",
              "--state", "/var/lib/meshsl", check=False)
    report["tampered_kit"] = {"exit": done.returncode, "message": done.stderr.strip()[-300:]}
    client.close()


def passed(report: dict) -> bool:
    return (report.get("hospital_b_drops_inbound") is True
            and set(report.get("refused_by_policy") or {}) == {"hospital_b"}
            and report.get("trained") == "finished" and report.get("weights_only_at_their_owner") is True
            and report.get("killed_site_job") == "finished" and report.get("killed_site_identical_weights") is True
            and report.get("killed_site_resumed_from_a_checkpoint") is True
            and report.get("aborted_everywhere") is True and report.get("abort_seconds", 99) < 10
            and "not signed" in str(report.get("unsigned_refused"))
            and report.get("tampered_kit", {}).get("exit") == 2
            and "changed after provisioning" in report["tampered_kit"]["message"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="localhost/meshsl:latest")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="meshsl-sites-"))).resolve()  # compose volumes: absolute
    report: dict = {}
    try:
        run(out, args.image, report)
    except Exception as exc:  # the report says how far it got
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        compose = out / "compose.yaml"
        if compose.exists():
            logs = sh(*COMPOSE, "-p", PROJECT, "-f", str(compose), "logs", check=False)
            (out / "containers.log").write_text(logs.stdout + logs.stderr)
            sh(*COMPOSE, "-p", PROJECT, "-f", str(compose), "down", check=False)
    report["passed"] = passed(report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
