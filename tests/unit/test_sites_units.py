"""The pure parts of sites and jobs: the broker's job board, a site's policy review, the message codec, the
catalogue loader, kit verification and signatures. No processes."""
from __future__ import annotations

import time

import pytest
import yaml

from meshsl.data import DatasetSpec, load_dataset
from meshsl.data.catalogue import CATALOGUE_ENV
from meshsl.data.registry import clear_dataset_cache
from meshsl.errors import DataError, KitTampered, ProtocolError, SignatureInvalid
from meshsl.apps.sites import messages as m
from meshsl.apps.sites.board import JobBoard
from meshsl.apps.sites.identity import create_identity, load_identity, verify
from meshsl.apps.sites.kit import verify_kit
from meshsl.apps.sites.review import job_topology, review
from meshsl.apps.sites.service import open_kit
from meshsl.apps.sites.specs import JobDocument, PolicySpec
from support.sites_project import setup_project


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    folder = tmp_path_factory.mktemp("project")
    kits = setup_project.make_project(folder, "tcp://127.0.0.1:7100", "tcp://127.0.0.1:7003")
    return folder, kits


def _job(text: str, job_id: str = "0123456789abcdef") -> JobDocument:
    return JobDocument(id=job_id, name="t", topology=text, submitter="alice", submitted_at=time.time())


# ---------------------------------------------------------------- the board

def _board() -> JobBoard:
    board = JobBoard({"lab": "lab", "hospital_a": "hospital-a", "hospital_b": "hospital-b"})
    for site in ("lab", "hospital_a"):
        board.connected(site)
    return board


def test_board_offers_to_connected_sites_and_to_late_ones_on_connection(made):
    folder, _ = made
    board = _board()
    out = board.submit(_job((folder / "job.yaml").read_text()))
    assert sorted(site for site, _ in out) == ["hospital_a", "lab"]
    assert all(isinstance(msg, m.Offer) for _, msg in out)
    late = board.connected("hospital_b")
    assert [(s, type(msg)) for s, msg in late] == [("hospital_b", m.Offer)]


def test_board_starts_only_when_every_site_approved_and_ends_on_a_refusal(made):
    folder, _ = made
    board = _board()
    board.connected("hospital_b")
    job = _job((folder / "job.yaml").read_text())
    board.submit(job)
    assert board.decided("lab", m.Decision(job=job.id, verdict="approve")) == []
    assert board.decided("hospital_a", m.Decision(job=job.id, verdict="wait")) == []
    starts = board.decided("hospital_b", m.Decision(job=job.id, verdict="approve"))
    assert starts == [] and board.jobs[job.id].state == "reviewing"
    starts = board.decided("hospital_a", m.Decision(job=job.id, verdict="approve"))
    assert {s for s, msg in starts if isinstance(msg, m.Start)} == {"lab", "hospital_a", "hospital_b"}
    assert board.jobs[job.id].state == "running"
    # a site that reconnects mid-run is told to start again (it resumes from its checkpoints)
    assert [type(msg) for _, msg in board.connected("hospital_a")] == [m.Start]
    for site in ("lab", "hospital_a"):
        board.reported(site, m.Status(job=job.id, state="finished"))
    assert board.jobs[job.id].state == "running"
    stops = board.reported("hospital_b", m.Status(job=job.id, state="failed", detail="disk full"))
    assert board.jobs[job.id].state == "failed" and "disk full" in board.jobs[job.id].reason
    assert {s for s, msg in stops if isinstance(msg, m.Stop)} == {"lab", "hospital_a", "hospital_b"}
    refused = _job((folder / "job.yaml").read_text(), "fedcba9876543210")
    board.submit(refused)
    board.decided("lab", m.Decision(job=refused.id, verdict="refuse", reason="no"))
    assert board.jobs[refused.id].state == "refused" and board.abort(refused.id, "late") == []


def test_board_refuses_a_job_for_a_party_without_a_site(made):
    folder, _ = made
    text = (folder / "job.yaml").read_text().replace("party: hospital-b", "party: elsewhere")
    with pytest.raises(Exception, match="elsewhere"):
        _board().submit(_job(text))


# ---------------------------------------------------------------- policy review

def _review(made, site: str, text: str | None = None, **policy) -> list[str]:
    folder, kits = made
    kit = verify_kit(kits[site])
    base = yaml.safe_load((folder / "sites" / site / "state" / "policy.yaml").read_text())
    catalogue_file = folder / "sites" / site / "data" / "catalogue.yaml"
    from meshsl.data.catalogue import read_catalogue
    job = _job(text or setup_project.without_forbidden_column((folder / "job.yaml").read_text()))
    topology_dir = folder / "review" / site
    topology_dir.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CATALOGUE_ENV, str(catalogue_file))
        clear_dataset_cache()
        return review(job, job_topology(job, topology_dir), kit, PolicySpec(**{**base, **policy}),
                      read_catalogue(catalogue_file))


def test_review_allows_the_job_its_policy_allows(made):
    assert _review(made, "hospital_b") == [] and _review(made, "lab") == [] and _review(made, "hospital_a") == []


def test_review_names_each_broken_rule(made):
    folder, _ = made
    assert any("'worst area'" in r for r in _review(made, "hospital_b", (folder / "job.yaml").read_text()))
    assert any("party 'hospital-b' is not one" in r for r in _review(made, "hospital_a", parties=["lab"]))
    assert any("not one this site's policy lets" in r for r in _review(made, "hospital_a", sources={}))
    assert any("defence(s) ['nopeek']" in r for r in _review(made, "hospital_a", required_defences=["nopeek"]))
    assert any("declares no DP" in r for r in _review(made, "hospital_a", max_epsilon=4.0))
    assert any("max_steps 5" in r for r in _review(made, "hospital_a", max_steps=5))
    assert any("may not run jobs here" in r for r in _review(made, "lab", submitters=["bob"]))
    segment_rule = {"records_a": {"segments": ["classifier"]}}
    assert any("would feed segment(s) ['encoder_a']" in r for r in _review(made, "hospital_a", sources=segment_rule))


def test_review_refuses_labels_leaving_and_raw_paths(made):
    folder, _ = made
    document = yaml.safe_load(setup_project.without_forbidden_column((folder / "job.yaml").read_text()))
    document["privacy"] = document["privacy"][:1]  # encoder_b's gradients would go back undefended
    reasons = _review(made, "lab", yaml.safe_dump(document))
    assert len(reasons) == 1 and "encoder_b->classifier" in reasons[0] and "labels_may_leave is false" in reasons[0]
    assert _review(made, "lab", yaml.safe_dump(document), labels_may_leave=True) == []
    document = yaml.safe_load(setup_project.without_forbidden_column((folder / "job.yaml").read_text()))
    document["data"][0]["dataset"] = {"name": "csv", "options": {"path": "/etc/passwd"}}
    assert any("reads dataset 'csv' directly" in r for r in _review(made, "hospital_a", yaml.safe_dump(document)))


# ---------------------------------------------------------------- messages, signatures, kits

@pytest.mark.parametrize("frame", [b"", b"\xff\xfe", b"[]", b'{"type": "nope"}', b'{"type": "decision", "job": "x"}',
                                   b'{"type": "status", "job": "0123456789abcdef", "state": "hacked"}',
                                   b'{"type": "ping", "extra": 1}', b"{" * 100_000])
def test_garbage_messages_are_refused_with_a_protocol_error(frame):
    with pytest.raises(ProtocolError) as caught:
        m.decode(frame, "hospital_a")
    assert caught.value.peer == "hospital_a"


def test_messages_round_trip():
    message = m.Decision(job="0123456789abcdef", verdict="refuse", reason="column")
    assert m.decode(m.encode(message)) == message


def test_signatures_cover_every_field(tmp_path):
    public = create_identity(tmp_path, "alice")
    identity = load_identity(tmp_path, "alice")
    document = {"job": "a", "topology": "x"}
    verify(document, identity.sign(document), public, "job a")
    with pytest.raises(SignatureInvalid, match="does not verify"):
        verify({**document, "topology": "y"}, identity.sign(document), public, "job a")
    with pytest.raises(SignatureInvalid, match="not signed"):
        verify(document, "", public, "job a")


@pytest.mark.parametrize("tamper, message", [
    (lambda kit: (kit / "README.md").write_text("run this instead"), "README.md was changed"),
    (lambda kit: (kit / "extra.sh").write_text("#!/bin/sh"), "extra.sh was added"),
    (lambda kit: (kit / "compose.yaml").unlink(), "compose.yaml listed in the signed manifest is missing"),
    (lambda kit: (kit / "MANIFEST.json").write_text(
        (kit / "MANIFEST.json").read_text().replace('"site": "hospital_a"', '"site": "lab"')), "does not verify"),
])
def test_a_tampered_kit_is_refused(tmp_path, tamper, message):
    kits = setup_project.make_project(tmp_path, "tcp://127.0.0.1:7100", "tcp://127.0.0.1:7003")
    verify_kit(kits["hospital_a"])
    tamper(kits["hospital_a"])
    with pytest.raises(KitTampered, match=message):
        verify_kit(kits["hospital_a"])


def test_a_kit_from_another_provisioner_is_refused_after_the_first_start(tmp_path):
    first = setup_project.make_project(tmp_path / "one", "tcp://127.0.0.1:7100", "tcp://127.0.0.1:7003")
    state = tmp_path / "one" / "sites" / "hospital_a" / "state"
    open_kit(first["hospital_a"], state)  # pins the provisioner
    from meshsl.apps.sites.kit import provision
    create_identity(tmp_path / "mallory", "mallory")
    forged = provision(tmp_path / "one" / "project.yaml", load_identity(tmp_path / "mallory", "mallory"),
                       tmp_path / "forged")
    with pytest.raises(KitTampered, match="not by the provisioner this site first started with"):
        open_kit(forged["hospital_a"], state)


# ---------------------------------------------------------------- the catalogue

def test_catalogue_entries_load_locally_and_as_their_published_schema_elsewhere(made, monkeypatch):
    folder, _ = made
    columns = yaml.safe_load((folder / "job.yaml").read_text())["data"][0]["dataset"]["options"]["columns"]
    spec = DatasetSpec(name="catalogue", options={"entry": "records_a", "rows": 569, "columns": columns})
    clear_dataset_cache()
    monkeypatch.delenv(CATALOGUE_ENV, raising=False)
    stub = load_dataset(spec)
    assert stub.features.shape == (569, 15) and not stub.features.any() and stub.features.strides == (0, 0)
    monkeypatch.setenv(CATALOGUE_ENV, str(folder / "sites" / "hospital_a" / "data" / "catalogue.yaml"))
    clear_dataset_cache()
    real = load_dataset(spec)
    assert real.features.shape == (569, 15) and real.features.any() and real.feature_names == tuple(columns)
    clear_dataset_cache()
    with pytest.raises(DataError, match="publishes columns"):
        load_dataset(DatasetSpec(name="catalogue", options={"entry": "records_a", "rows": 569,
                                                            "columns": list(reversed(columns))}))
    monkeypatch.delenv(CATALOGUE_ENV)
    clear_dataset_cache()
    with pytest.raises(DataError, match="publishes no schema"):
        load_dataset(DatasetSpec(name="catalogue", options={"entry": "records_a"}))
