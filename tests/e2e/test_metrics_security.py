"""The metrics endpoint keeps training figures from whoever can reach the port: loopback by default,
and HTTPS with client certificates (mutual TLS) when the topology asks for it."""
from __future__ import annotations

import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from meshsl.launch.entry import make_metrics
from meshsl.launch.launcher import free_port
from meshsl.topology.model import load_topology

ROOT = Path(__file__).resolve().parents[2]


def _topology(tmp_path: Path, security: dict, endpoint_host: str = "127.0.0.1"):
    document = yaml.safe_load((ROOT / "topologies" / "vanilla.yaml").read_text())
    for node in document["nodes"]:
        node["endpoint"] = f"tcp://{endpoint_host}:{free_port()}"
        node.pop("metrics_port", None)
    document["nodes"][0]["metrics_port"] = free_port()
    document["security"] = security
    path = ROOT / "topologies" / f"_test_metrics_{tmp_path.name}.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        return load_topology(path)
    finally:
        path.unlink()


def test_metrics_bind_loopback_even_when_the_node_listens_everywhere(tmp_path):
    topology = _topology(tmp_path, {}, endpoint_host="*")
    node = topology.spec.nodes[0].name
    metrics = make_metrics(topology, node)
    try:
        assert metrics._server.server_address[0] == "127.0.0.1"
    finally:
        metrics.close()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_metrics_over_mutual_tls_answer_only_certified_scrapers(tmp_path):
    for name in ("ca", "server", "scraper"):
        _openssl("req", "-x509" if name == "ca" else "-new", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                 "-subj", f"/CN={'127.0.0.1' if name == 'server' else name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.{'pem' if name == 'ca' else 'csr'}", cwd=tmp_path)
    for name in ("server", "scraper"):
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "1", "-out", f"{name}.pem", cwd=tmp_path)
    topology = _topology(tmp_path, {"metrics_tls": {"certfile": str(tmp_path / "server.pem"),
                                                    "keyfile": str(tmp_path / "server.key"),
                                                    "client_cafile": str(tmp_path / "ca.pem")}})
    node = topology.spec.nodes[0].name
    metrics = make_metrics(topology, node)
    url = f"https://127.0.0.1:{topology.nodes[node].metrics_port}/metrics"
    try:
        anonymous = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        anonymous.check_hostname = False
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            urllib.request.urlopen(url, context=anonymous, timeout=10).read()
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            urllib.request.urlopen(url.replace("https", "http"), timeout=10).read()  # plain HTTP: nothing
        certified = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        certified.check_hostname = False
        certified.load_cert_chain(str(tmp_path / "scraper.pem"), str(tmp_path / "scraper.key"))
        body = urllib.request.urlopen(url, context=certified, timeout=10).read().decode()
        assert "meshsl_up" in body
    finally:
        metrics.close()
