"""The deployment files as written: the image, the systemd units, a kit's compose file and unit, and the
Kubernetes manifests (validated offline, strictly). `make test-containers` runs them for real."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from support.sites_project import setup_project

ROOT = Path(__file__).resolve().parents[2]
NODES = ROOT / "nodes"


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    joined = text.replace("\\\n", " ")
    for line in joined.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    return setup_project.make_project(tmp_path_factory.mktemp("kits"), "tcp://lab:7100", "tcp://lab:7003")


@pytest.mark.parametrize("unit", ["node", "site"])
def test_units_write_only_under_their_state_directory_and_save_weights(unit, kits):
    text = (NODES / "meshsl-node@.service").read_text() if unit == "node" else \
        (kits["hospital_a"] / "meshsl-site.service").read_text()
    d = _directives(text)
    assert d["ProtectSystem"] == ["strict"] and d["StateDirectory"] == ["meshsl"]
    assert d["WorkingDirectory"] == ["/var/lib/meshsl"] and d["ReadWritePaths"] == ["/var/lib/meshsl"]
    command = d["ExecStart"][0].split()
    assert command[0] == "/opt/meshsl/.venv/bin/meshsl"
    if unit == "node":
        for option in ("--checkpoint-dir", "--weights-out"):
            assert command[command.index(option) + 1].startswith("/var/lib/meshsl/"), option
        assert d["RestartPreventExitStatus"] == ["2 3"]
    else:
        assert command[command.index("--state") + 1] == "/var/lib/meshsl"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze on this machine")
def test_units_pass_systemd_analyze_verify_but_for_the_missing_binary(tmp_path, kits):
    for source, name in ((NODES / "meshsl-node@.service", "meshsl-node@lab.service"),
                         (kits["lab"] / "meshsl-site.service", "meshsl-site.service")):
        (tmp_path / name).write_text(source.read_text())
        done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True)
        problems = [line for line in (done.stdout + done.stderr).splitlines()
                    if line.strip() and "/opt/meshsl/.venv/bin/meshsl is not executable" not in line]
        assert problems == [], problems


def test_the_image_gives_its_user_writable_state_and_the_psi_extra():
    text = (NODES / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()]
    user_at = next(i for i, line in enumerate(lines) if line.startswith("USER "))
    chown = next(i for i, line in enumerate(lines) if "chown 65534:65534 /var/lib/meshsl /out" in line)
    assert chown < user_at and lines[user_at] == "USER 65534:65534"
    assert any(line.startswith("RUN pip install") and ".[psi]" in line for line in lines)
    assert any(line.startswith("ARG BASE=") for line in lines) and "FROM ${BASE}" in lines


def test_a_kit_compose_file_runs_its_site_from_the_kit(kits):
    for site, kit in kits.items():
        services = yaml.safe_load((kit / "compose.yaml").read_text())["services"]
        command = services[site]["command"]
        assert command[:2] == ["site", "start"] and ("--host-broker" in command) == (site == "lab")
        assert "./:/kit:ro" in services[site]["volumes"]


def test_kubernetes_manifests_validate_strictly_offline():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.utils.latest_version()
    count = 0
    for path in sorted((NODES / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(document, version, strict=True)
            count += 1
    assert count >= 4
