"""Vertical data as it really arrives: PSI on sample ids, partial overlap, any row order.

The example topology's parties hold shuffled, partially overlapping CSV files with string ids; after
the PSI (run by the node processes over their ZeroMQ sockets) training gives bit-identical weights
to training on the pre-aligned intersection. Each bad input gets an error naming file, party and column.
"""
from __future__ import annotations

import asyncio
import csv
import random
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("private_set_intersection.python")

from meshsl.align.ids import source_ids  # noqa: E402
from meshsl.node.align_runner import align_locally, align_node, session_for  # noqa: E402
from meshsl.align.session import AlignmentError, encode  # noqa: E402
from meshsl.config.loader import ConfigErrors, load_spec  # noqa: E402
from meshsl.errors import ConfigError  # noqa: E402
from meshsl.schedule.steps import sample_pools  # noqa: E402
from meshsl.launch.launcher import LocalRun  # noqa: E402
from meshsl.topology.model import load_topology, topology_from_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "topologies" / "vertical_psi.yaml"
DATA = ROOT / "topologies" / "data" / "vertical_psi"


def read_rows(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], {r[0]: r for r in rows[1:]}


def write_topology(tmp_path: Path, document: dict, name: str = "t.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def example_document(tmp_path: Path, files: dict[str, list[list[str]]] | None = None, **alignment) -> dict:
    """The example topology with its data paths pointing at `files` (party csv name -> rows) in tmp_path."""
    document = yaml.safe_load(EXAMPLE.read_text())
    for entry in document["data"]:
        source = Path(entry["dataset"]["options"]["path"]).name
        if files is not None:
            with (tmp_path / source).open("w", newline="") as handle:
                csv.writer(handle).writerows(files[source])
            entry["dataset"]["options"]["path"] = source
        else:
            entry["dataset"]["options"]["path"] = str(DATA / source)
    if alignment:
        document["alignment"] = {**document.get("alignment", {}), **alignment}
    return document


def example_files() -> dict[str, list[list[str]]]:
    out = {}
    for name in ("hospital_a.csv", "hospital_b.csv", "lab.csv"):
        header, rows = read_rows(DATA / name)
        out[name] = [header, *rows.values()]
    return out


# ---- the example: overlap, order, equivalence with pre-aligned data ------------------------------
def test_example_files_overlap_partially_in_different_orders():
    ids = {name: list(read_rows(DATA / name)[1]) for name in ("hospital_a.csv", "hospital_b.csv", "lab.csv")}
    common = set.intersection(*(set(v) for v in ids.values()))
    for name, values in ids.items():
        assert 0.65 <= len(common) / len(values) <= 0.8, name  # about 70 % overlap, extra rows on each side
        assert all(isinstance(v, str) and not v.isdigit() for v in values)
    assert ids["hospital_a.csv"][:50] != ids["hospital_b.csv"][:50]  # shuffled independently


def test_psi_finds_exactly_the_common_ids_in_one_agreed_order():
    topology = load_topology(EXAMPLE)
    outcomes = align_locally(topology)
    expected = sorted(set.intersection(*(set(source_ids(topology, d)) for d in topology.data)))
    for node, outcome in outcomes.items():
        assert outcome.ids == expected and outcome.size == 300, node
    assert outcomes["lab"].pair_sizes == {"hospital_a": 300, "hospital_b": 300}
    pools = sample_pools(topology)
    assert len(pools.train[0]) + len(pools.test) == 300


def test_three_data_parties_with_different_pairwise_overlaps(tmp_path):
    """A member's pairwise overlap with the leader is more than the common set: FINAL narrows it down."""
    rng = random.Random(5)
    universe = [f"id-{rng.getrandbits(40):010x}" for _ in range(400)]
    files = example_files()
    header_a, header_b = files["hospital_a.csv"][0], files["hospital_b.csv"][0]
    a_rows, b_rows = files["hospital_a.csv"][1:], files["hospital_b.csv"][1:]
    held = {"hospital_a.csv": universe[:250], "hospital_b.csv": universe[100:380], "lab.csv": universe[50:300]}
    files = {"hospital_a.csv": [header_a] + [[i, *a_rows[k % len(a_rows)][1:]] for k, i in enumerate(held["hospital_a.csv"])],
             "hospital_b.csv": [header_b] + [[i, *b_rows[k % len(b_rows)][1:]] for k, i in enumerate(held["hospital_b.csv"])],
             "lab.csv": [["patient_id", "diagnosis"]] + [[i, str(k % 2)] for k, i in enumerate(held["lab.csv"])]}
    for rows in files.values():
        body = rows[1:]
        rng.shuffle(body)
        rows[1:] = body
    topology = load_topology(write_topology(tmp_path, example_document(tmp_path, files, min_intersection=10)))
    outcomes = align_locally(topology)
    expected = sorted(set(universe[100:250]))
    assert all(o.ids == expected for o in outcomes.values())
    assert outcomes["lab"].pair_sizes == {"hospital_a": 200, "hospital_b": 200}
    assert outcomes["hospital_a"].pair_sizes == {"lab": 200}  # what a member learns beyond the common set


def _train(path: Path, run_dir: Path) -> dict:
    from safetensors.torch import load_file
    run = LocalRun(path, run_dir, free_ports=True, weights_out=run_dir / "weights", evaluate=False)
    resolved = run.prepare()
    topology = topology_from_spec(load_spec(resolved), str(resolved), path.parent)
    run.start(topology, resolved)
    try:
        run.follow(topology, timeout=240)
    finally:
        run.stop()
    return {p.stem: load_file(str(p)) for p in sorted((run_dir / "weights").glob("*.safetensors"))}


@pytest.mark.timeout(600)
def test_psi_run_across_processes_equals_training_on_the_pre_aligned_intersection(tmp_path):
    document = example_document(tmp_path)
    document["training"].update(steps=12, eval_every=0)
    for node in document["nodes"]:
        node.pop("metrics_port", None)
    psi_path = write_topology(tmp_path, document, "psi.yaml")
    # The same patients by hand: the common ids, sorted, no id column, no alignment step.
    files = example_files()
    common = sorted(set.intersection(*({r[0] for r in rows[1:]} for rows in files.values())))
    plain = yaml.safe_load(psi_path.read_text())
    plain.pop("alignment")
    for entry in plain["data"]:
        name = Path(entry["dataset"]["options"]["path"]).name
        header, by_id = read_rows(DATA / name)
        with (tmp_path / f"aligned_{name}").open("w", newline="") as handle:
            out = csv.writer(handle)
            out.writerow(header[1:])
            out.writerows(by_id[i][1:] for i in common)
        entry["dataset"]["options"]["path"] = f"aligned_{name}"
        entry.pop("id_column")
    plain_path = write_topology(tmp_path, plain, "plain.yaml")

    psi_weights = _train(psi_path, tmp_path / "psi-run")
    plain_weights = _train(plain_path, tmp_path / "plain-run")
    assert psi_weights.keys() == plain_weights.keys() == {"encoder_a", "encoder_b", "classifier"}
    for segment, state in plain_weights.items():
        for key, value in state.items():
            assert torch.equal(psi_weights[segment][key], value), f"{segment}.{key} differs"
    initial = load_topology(plain_path)
    from meshsl.compute.worker import build_module
    assert not torch.equal(build_module(initial, "classifier").state_dict()["0.weight"],
                           plain_weights["classifier"]["0.weight"])  # it did train

    # Prediction by id: the parties' own files (shuffled, partial overlap) plus the lab's list of ids to
    # score; the predictions carry the ids and equal the model applied to the pre-aligned rows.
    from meshsl.apps.predict import load_predictions, predict_local
    lab_ids = tmp_path / "lab_ids.csv"
    lab_ids.write_text("patient_id\n" + "\n".join(read_rows(DATA / "lab.csv")[1]) + "\n")
    predict_local(psi_path, tmp_path / "psi-run" / "weights",
                  {"hospital_a": DATA / "hospital_a.csv", "hospital_b": DATA / "hospital_b.csv", "lab": lab_ids},
                  tmp_path / "predictions", run_dir=tmp_path / "predict-run", free_ports=True, timeout=240)
    predicted = load_predictions(tmp_path / "predictions" / "cancer.csv")
    assert list(predicted["id"]) == common
    plain_topology = load_topology(plain_path)
    modules = {}
    for segment, state in plain_weights.items():
        modules[segment] = build_module(plain_topology, segment)
        modules[segment].load_state_dict(state)
    from meshsl.compute.node_data import NodeData
    x = {**NodeData(plain_topology, "hospital_a").tensors, **NodeData(plain_topology, "hospital_b").tensors}
    with torch.no_grad():
        hidden = torch.cat([modules["encoder_a"](x["features_a"]), modules["encoder_b"](x["features_b"])], dim=1)
        probs = modules["classifier"](hidden).softmax(dim=1)
    assert torch.allclose(torch.as_tensor(predicted["prob_1"], dtype=torch.float32), probs[:, 1], atol=1e-6)


# ---- bad input: each gets a clear error naming file, party and column ----------------------------
def _errors(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_topology(path)
    return str(caught.value)


def test_missing_id_column_names_file_party_and_column(tmp_path):
    files = example_files()
    files["hospital_b.csv"][0] = ["pid", *files["hospital_b.csv"][0][1:]]
    text = _errors(write_topology(tmp_path, example_document(tmp_path, files)))
    assert "hospital_b.csv" in text and "'hospital-b'" in text and "'patient_id'" in text and "features_b" in text


def test_duplicate_ids_within_a_party(tmp_path):
    files = example_files()
    files["lab.csv"][7][0] = files["lab.csv"][3][0]
    text = _errors(write_topology(tmp_path, example_document(tmp_path, files)))
    assert "duplicate id" in text and repr(files["lab.csv"][3][0]) in text
    assert "lab.csv" in text and "'lab'" in text and "'patient_id'" in text and "rows 3 and 7" in text


def test_empty_id_and_missing_ids_on_one_source(tmp_path):
    files = example_files()
    files["hospital_a.csv"][5][0] = " "
    text = _errors(write_topology(tmp_path, example_document(tmp_path, files)))
    assert "empty id" in text and "hospital_a.csv" in text
    document = example_document(tmp_path)
    document["data"][0]["dataset"]["options"]["path"] = str(DATA / "hospital_a.csv")
    del document["data"][2]["id_column"]
    document["data"][2]["dataset"] = {"name": "breast_cancer"}
    text = _errors(write_topology(tmp_path, document))
    assert "diagnosis" in text and "declares no sample ids" in text


def test_id_column_needs_a_csv_dataset(tmp_path):
    document = example_document(tmp_path)
    document["data"][2]["dataset"] = {"name": "breast_cancer"}
    with pytest.raises(ConfigErrors) as caught:
        load_topology(write_topology(tmp_path, document))
    assert "id_column" in str(caught.value) and "id_file" in str(caught.value)


def test_id_file_aligns_any_dataset(tmp_path):
    files = example_files()
    document = example_document(tmp_path, files)
    lab_ids = [r[0] for r in files["lab.csv"][1:]]
    (tmp_path / "lab_ids.txt").write_text("\n".join(lab_ids) + "\n")
    (tmp_path / "lab_only.csv").write_text("diagnosis\n" + "\n".join(r[1] for r in files["lab.csv"][1:]) + "\n")
    document["data"][2] = {"name": "diagnosis", "node": "lab", "kind": "labels", "id_file": "lab_ids.txt",
                           "dataset": {"name": "csv", "options": {"path": "lab_only.csv", "label_column": "diagnosis"}}}
    topology = load_topology(write_topology(tmp_path, document))
    assert align_locally(topology)["lab"].size == 300
    (tmp_path / "lab_ids.txt").write_text("\n".join(lab_ids[:-1]) + "\n")
    text = _errors(write_topology(tmp_path, document, "short.yaml"))
    assert "lab_ids.txt" in text and "388 ids for 389 data rows" in text


def test_empty_intersection_and_minimum_fail_on_every_party(tmp_path):
    files = example_files()
    files["lab.csv"] = [files["lab.csv"][0]] + [[f"other-{k:06d}", r[1]] for k, r in enumerate(files["lab.csv"][1:])]
    topology = load_topology(write_topology(tmp_path, example_document(tmp_path, files)))
    with pytest.raises(AlignmentError) as caught:
        align_locally(topology)
    assert "no sample in common" in str(caught.value) and "patient_id" in str(caught.value)
    topology = load_topology(write_topology(tmp_path, example_document(tmp_path, min_intersection=301), "min.yaml"))
    results = asyncio.run(_gather_each(topology))
    assert len(results) == 3 and all(isinstance(r, AlignmentError) for r in results.values())
    assert all("300 samples in common, fewer than alignment.min_intersection = 301" in str(r) for r in results.values())
    assert "hospital_b.csv" in str(results["hospital_b"]) and "'hospital-b'" in str(results["hospital_b"])


async def _gather_each(topology) -> dict:
    from meshsl.transport.inprocess import InProcessHub, InProcessTransport
    book = {n: f"inproc://align-test-{id(topology)}-{n}" for n in topology.nodes}
    hub = InProcessHub()
    transports = {n: InProcessTransport(n, book[n], book, hub=hub) for n in topology.nodes}
    for t in transports.values():
        await t.start()
    try:
        results = await asyncio.gather(*(align_node(topology, n, transports[n]) for n in topology.nodes),
                                       return_exceptions=True)
    finally:
        for t in transports.values():
            await t.close()
    return dict(zip(topology.nodes, results))


# ---- protocol robustness and restart ---------------------------------------------------------------
def test_garbage_and_foreign_alignment_messages_are_dropped(tmp_path):
    topology = load_topology(EXAMPLE)

    async def scenario():
        from meshsl.transport.inprocess import InProcessHub, InProcessTransport
        book = {n: f"inproc://align-garbage-{n}" for n in [*topology.nodes, "intruder"]}
        hub = InProcessHub()
        intruder = InProcessTransport("hospital_a", book["intruder"], book, hub=hub)  # claims nothing: sender is its name
        await intruder.start()
        transports = {n: InProcessTransport(n, book[n], book, hub=hub) for n in topology.nodes}
        for t in transports.values():
            await t.start()
        # Before the real parties speak: malformed frames, another topology's message, a wrong type.
        await intruder.send("lab", [b"meshsl-align/1", b"{not json", b""])
        await intruder.send("lab", encode("request", "0123456789abcdef", b"\x00" * 10, count=5))
        await intruder.send("hospital_b", encode("final", topology.hash, b"", size=3))
        try:
            sessions = {n: session_for(topology, n, transports[n]) for n in topology.nodes}
            from meshsl.align.ids import node_ids
            results = await asyncio.gather(*(s.run(node_ids(topology, n).ids) for n, s in sessions.items()))
        finally:
            for t in [*transports.values(), intruder]:
                await t.close()
        return results, sessions

    results, sessions = asyncio.run(scenario())
    assert [r.size for r in results] == [300, 300, 300]
    assert sessions["lab"].dropped == 2 and sessions["hospital_b"].dropped == 1


def test_restarted_node_reuses_its_saved_alignment(tmp_path):
    topology = load_topology(EXAMPLE)

    async def first_run():
        from meshsl.transport.inprocess import InProcessHub, InProcessTransport
        book = {n: f"inproc://align-cache-{n}" for n in topology.nodes}
        hub = InProcessHub()
        transports = {n: InProcessTransport(n, book[n], book, hub=hub) for n in topology.nodes}
        for t in transports.values():
            await t.start()
        try:
            return await asyncio.gather(*(align_node(topology, n, transports[n], tmp_path) for n in topology.nodes))
        finally:
            for t in transports.values():
                await t.close()

    first = asyncio.run(first_run())
    assert (tmp_path / "hospital_b" / "alignment.json").is_file()

    class Unreachable:
        async def send(self, *_):
            raise AssertionError("a resumed node must not start a new PSI")

        async def recv(self):
            raise AssertionError("a resumed node must not start a new PSI")

    again = asyncio.run(align_node(topology, "hospital_b", Unreachable(), tmp_path, resume=True))
    assert again.ids == first[1].ids and again.size == 300


def test_alignment_over_curve_authenticated_zeromq(tmp_path):
    """The same protocol on the node's ZeroMQ transport with CURVE on (what `meshsl node` uses)."""
    import zmq
    if not zmq.has("curve"):
        pytest.skip("libzmq without CURVE")
    from meshsl.node.keys_loading import transport_security
    from meshsl.launch.launcher import with_free_ports
    from meshsl.transport import make_transport
    document = with_free_ports(example_document(tmp_path))
    keys = tmp_path / "keys"
    document["security"] = {"curve": True, "keys_dir": str(keys)}
    path = write_topology(tmp_path, document)
    from typer.testing import CliRunner
    from meshsl.cli import app
    assert CliRunner().invoke(app, ["keys", "generate", str(keys), "--topology", str(path)]).exit_code == 0
    topology = load_topology(path)

    async def scenario():
        book = {n: s.endpoint for n, s in topology.nodes.items()}
        transports = {n: make_transport(n, book[n], book, **transport_security(topology, n, lambda reason: None))
                      for n in topology.nodes}
        for t in transports.values():
            await t.start()
        try:
            return await asyncio.gather(*(align_node(topology, n, transports[n]) for n in topology.nodes))
        finally:
            for t in transports.values():
                await t.close()

    outcomes = asyncio.run(scenario())
    assert [o.size for o in outcomes] == [300, 300, 300] and outcomes[0].ids == outcomes[2].ids


# ---- the commands ------------------------------------------------------------------------------------
def test_align_command_reports_overlap_per_pair_and_plan_shows_the_step():
    import json

    from typer.testing import CliRunner

    from meshsl.cli import app
    runner = CliRunner()
    result = runner.invoke(app, ["align", str(EXAMPLE), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    pairs = {tuple(p["parties"]): p["common"] for p in report["pairs"]}
    assert pairs == {("hospital-a", "hospital-b"): 340, ("hospital-a", "lab"): 300, ("hospital-b", "lab"): 300}
    assert (report["common"], report["train"], report["test"]) == (300, 240, 60)
    text = runner.invoke(app, ["align", str(EXAMPLE)]).output
    assert "83% / 83%" in text and "300 samples -> 240 train / 60 test" in text
    plan = runner.invoke(app, ["plan", str(EXAMPLE), "--json"])
    step = json.loads(plan.output)["alignment"]
    assert step["leader"] == "lab" and step["members"] == ["hospital_a", "hospital_b"]
    assert "patient_id" in step["ids"]["features_a"]["from"]
    assert "alignment step" in runner.invoke(app, ["plan", str(EXAMPLE)]).output
    plain = runner.invoke(app, ["align", str(ROOT / "topologies" / "vertical.yaml")])
    assert plain.exit_code == 2 and "no data source names sample ids" in plain.output


def test_nodes_stop_with_the_alignment_error_instead_of_training(tmp_path):
    """In the nodes themselves (no local pre-check): every node stops, the run fails naming the cause."""
    from meshsl.errors import PeerFailed
    from meshsl.coordinator.runtime import RunOptions
    from meshsl.launch.simulate import simulate
    topology = load_topology(write_topology(tmp_path, example_document(tmp_path, min_intersection=301)))
    with pytest.raises(PeerFailed) as caught:
        asyncio.run(simulate(topology, RunOptions(steps=2)))
    assert "fewer than alignment.min_intersection = 301" in str(caught.value)


def test_local_tools_intersect_in_the_clear_with_the_same_result(tmp_path):
    topology = load_topology(EXAMPLE)
    from meshsl.node.align_runner import intersect_locally
    local = intersect_locally(topology)
    psi_topology = load_topology(EXAMPLE)
    assert {n: o.ids for n, o in align_locally(psi_topology).items()} == {n: o.ids for n, o in local.items()}
    document = example_document(tmp_path, min_intersection=301)
    with pytest.raises(AlignmentError, match="hospital_a.csv.*hospital_b.csv.*lab.csv"):
        intersect_locally(load_topology(write_topology(tmp_path, document)))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_after_psi_resumes_from_the_saved_alignment_with_identical_weights(tmp_path):
    """A node killed mid-training restarts with --resume, takes its alignment from its checkpoint
    folder (its peers are past the PSI) and the run ends with the weights of an uninterrupted one."""
    from support.processes import assert_same_weights, kill_at, saved_weights as weights, train
    document = example_document(tmp_path)
    document["training"].update(steps=16, eval_every=0)
    document["checkpoint"] = {"every": 1}
    document["retry"] = {"heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 4.0, "timeout_s": 60,
                         "startup_timeout_s": 120, "max_restarts": 3}
    for node in document["nodes"]:
        node.pop("metrics_port", None)
    path = write_topology(tmp_path, document)
    train(path, tmp_path / "reference")
    for victim in ("hospital_a", "lab"):  # a member, and the leader (also the coordinator)
        _, run = train(path, tmp_path / f"kill-{victim}", kill_at(victim, 6))
        assert run.restarts.get(victim)
        assert "alignment restored" in (tmp_path / f"kill-{victim}" / f"{victim}.log").read_text()
        assert_same_weights(weights(tmp_path / "reference"), weights(tmp_path / f"kill-{victim}"))
