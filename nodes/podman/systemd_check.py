"""The systemd units, run for real: an image with systemd as PID 1 (built FROM the meshsl image) runs a
provisioned site's meshsl-site.service and the meshsl-node@.service template, each checked with
`systemd-analyze verify` inside the image (where /opt/meshsl/.venv/bin/meshsl exists) and started with
`systemctl start`.

    python nodes/podman/systemd_check.py [--image localhost/meshsl:latest]

Prints a JSON report; exits 1 when a check fails. CI: .ci/run (the container tier)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "sites"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import setup_project  # noqa: E402
from sites_demo import sh  # noqa: E402

SYSTEMD_IMAGE = "localhost/meshsl-systemd:latest"
CONTAINERFILE = """FROM {image}
USER root
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd systemd-sysv \\
    && rm -rf /var/lib/apt/lists/* && useradd --system --home /var/lib/meshsl --shell /usr/sbin/nologin meshsl
COPY kit /etc/meshsl/kit
COPY meshsl-site.service meshsl-node@.service /etc/systemd/system/
COPY vanilla.yaml /etc/meshsl/topology.yaml
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT []
CMD ["/sbin/init"]
"""


def build(image: str, context: Path) -> None:
    out = Path(tempfile.mkdtemp(prefix="meshsl-systemd-"))
    kits = setup_project.make_project(out, "tcp://127.0.0.1:7100", "tcp://127.0.0.1:7003")
    sh("cp", "-r", str(kits["lab"]), str(context / "kit"))
    sh("cp", str(kits["lab"] / "meshsl-site.service"), str(ROOT / "nodes" / "meshsl-node@.service"), str(context))
    sh("cp", str(ROOT / "topologies" / "vanilla.yaml"), str(context / "vanilla.yaml"))
    (context / "Containerfile").write_text(CONTAINERFILE.format(image=image))
    sh("podman", "build", "-t", SYSTEMD_IMAGE, "-f", str(context / "Containerfile"), str(context))
    # the site's own state: made on its side, handed to the unit's user
    state = out / "sites" / "lab" / "state"
    (context / "state.tar").write_bytes(sh("tar", "-C", str(state), "-c", ".", text=False).stdout)  # type: ignore


def wait_active(name: str, unit: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        state = sh("podman", "exec", name, "systemctl", "is-active", unit, check=False).stdout.strip()
        if state in ("active", "failed") or time.monotonic() > deadline:
            return state
        time.sleep(0.5)  # polling systemd


def journal_has(name: str, unit: str, text: str, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in sh("podman", "exec", name, "journalctl", "-u", unit, "--no-pager", check=False).stdout:
            return True
        time.sleep(0.5)  # polling the journal
    return False


def listening(name: str, port: int, timeout_s: float = 60) -> bool:
    """The node (waiting for its peers, silent at INFO) accepts connections at its declared port."""
    probe = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sh("podman", "exec", name, "python3", "-c", probe, check=False).returncode == 0:
            return True
        time.sleep(0.5)  # polling the port
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image", default="localhost/meshsl:latest")
    args = parser.parse_args()
    report: dict = {}
    context = Path(tempfile.mkdtemp(prefix="meshsl-systemd-build-"))
    name = "meshsl-systemd-check"
    try:
        build(args.image, context)
        sh("podman", "rm", "-f", name, check=False)
        sh("podman", "run", "-d", "--name", name, "--systemd=always", SYSTEMD_IMAGE)
        for unit in ("meshsl-site.service", "meshsl-node@lab.service"):
            done = sh("podman", "exec", name, "systemd-analyze", "verify", f"/etc/systemd/system/{unit.replace('@lab', '@')}",
                      check=False)
            report[f"verify {unit}"] = (done.stdout + done.stderr).strip() or "clean"
        sh("podman", "exec", name, "mkdir", "-p", "/var/lib/meshsl")
        sh("podman", "cp", str(context / "state.tar"), f"{name}:/tmp/state.tar")
        sh("podman", "exec", name, "sh", "-c", "tar -C /var/lib/meshsl -xf /tmp/state.tar && chown -R meshsl:meshsl /var/lib/meshsl")
        sh("podman", "exec", name, "systemctl", "start", "meshsl-site.service")
        report["site unit"] = wait_active(name, "meshsl-site.service")
        report["site journal shows the broker and the agent"] = (
            journal_has(name, "meshsl-site.service", "listening on") and
            journal_has(name, "meshsl-site.service", "dialled the broker"))
        sh("podman", "exec", name, "systemctl", "start", "meshsl-node@server.service")
        report["node unit"] = wait_active(name, "meshsl-node@server.service")
        report["node listening at its endpoint"] = listening(name, 5702)
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        sh("podman", "rm", "-f", name, check=False)
    report["passed"] = (all(v == "clean" for k, v in report.items() if k.startswith("verify"))
                        and report.get("site unit") == "active" and report.get("node unit") == "active"
                        and report.get("node listening at its endpoint") is True
                        and all(v is True for k, v in report.items() if "journal" in k))
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
