"""Using the trained model: prediction through the topology (real node processes over ZeroMQ), per-party
export, assembly, held-out evaluation; and in-process checks that predictions stay with their owner."""
from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from meshsl.cli import app
from meshsl.data import load_dataset
from meshsl.errors import ConfigError, DataError
from meshsl.schedule.steps import sample_pools
from meshsl.apps.predict import PartyOffline, load_predictions, predict_local
from meshsl.protocol.envelope import Kind
from meshsl.protocol.frames import decode_message
from meshsl.topology.model import load_topology

ROOT = Path(__file__).resolve().parents[2]
VERTICAL = ROOT / "topologies" / "vertical.yaml"
DOCS = ROOT / "docs" / "using-the-model.md"
runner = CliRunner()


def cli(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """vertical.yaml trained by `meshsl run --weights-out`, and held-out rows split by hospital."""
    base = tmp_path_factory.mktemp("vertical")
    weights = base / "weights"
    result = cli("run", VERTICAL, "--free-ports", "--steps", "30", "--no-progress", "--weights-out", weights,
                 "--run-dir", base / "train", "--timeout", "120")
    assert result.exit_code == 0, result.output
    topology = load_topology(VERTICAL)
    test = sample_pools(topology).test
    table = load_dataset(topology.data["features_a"].dataset, topology.base_dir)
    x, y = table.features[test].astype(np.float32), table.labels[test]
    header = ",".join(f"a{i}" for i in range(15))
    np.savetxt(base / "hospital_a.csv", x[:, :15], delimiter=",", header=header, comments="", fmt="%.9g")
    np.save(base / "hospital_b.npy", x[:, 15:])
    return {"base": base, "weights": weights, "x": x, "y": y, "topology": topology}


def test_predict_then_export_assemble_gives_the_same_predictions(trained):
    base, weights = trained["base"], trained["weights"]
    out = base / "predictions"
    result = cli("predict", VERTICAL, "--weights", weights, "--input", f"hospital_a={base / 'hospital_a.csv'}",
                 "--input", f"hospital_b={base / 'hospital_b.npy'}", "--output", out, "--free-ports",
                 "--batch-size", "16", "--run-dir", base / "predict", "--timeout", "120")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["cancer.csv"]  # written by the lab, the owner
    summary = json.loads((base / "predict" / "summary.json").read_text())
    n = len(trained["y"])
    assert summary["tasks"]["cancer"] == {"rows": n, "owners": ["lab"], "files": ["cancer.csv"]}
    # 114 rows in micro-batches of 16: one round (rounds hold up to 65,536 rows) of 8 pipelined micro-batches
    assert summary["rounds"] == 1 and summary["rows_per_micro_batch"] == 16
    assert "prob_1" not in json.dumps(summary)  # the coordinator got counts, not predictions
    distributed = load_predictions(out / "cancer.csv")
    assert distributed["row"].tolist() == list(range(n))
    assert np.allclose(distributed["prob_0"] + distributed["prob_1"], 1.0, atol=1e-6)
    assert (distributed["prediction"] == trained["y"]).mean() > 0.8  # the trained model, not the initial one

    exports = []
    for node in ("hospital_a", "hospital_b", "lab"):
        exports.append(base / f"export_{node}")
        result = cli("export", VERTICAL, "--weights", weights, "--node", node, "--out", exports[-1])
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in exports[0].iterdir()) == ["encoder_a.json", "encoder_a.safetensors"]

    missing = cli("assemble", VERTICAL, exports[0], exports[1], "--out", base / "partial.pt")
    assert missing.exit_code == 2 and "classifier (owner lab, party lab)" in missing.output
    assert not (base / "partial.pt").exists()
    for target in (base / "model.pt", base / "model_dir"):
        result = cli("assemble", VERTICAL, *exports, "--out", target)
        assert result.exit_code == 0, result.output
        from meshsl.apps.export import load_assembled
        model = load_assembled(target)
        x = torch.from_numpy(trained["x"])
        probs = model.predict_proba({"features_a": x[:, :15], "features_b": x[:, 15:]})["cancer"].numpy()
        assert np.allclose(probs[:, 1], distributed["prob_1"], atol=1e-6, rtol=0)
        assert (probs.argmax(1) == distributed["prediction"]).all()

    # The documented plain-torch loader rebuilds a party's segment without meshsl.
    code = re.search(r"<!-- loader -->\n```python\n(.*?)```", DOCS.read_text(), re.S).group(1)
    namespace: dict = {}
    code = code.replace('"export_a/', f'"{exports[0]}/')
    exec(compile(code, "docs-loader", "exec"), namespace)  # noqa: S102 - our own documentation
    segment = namespace["segment"]
    assert "meshsl" not in type(segment).__module__
    from meshsl.apps.export import load_segment
    reference, _ = load_segment(exports[0] / "encoder_a.json")
    sample = torch.from_numpy(trained["x"][:8, :15])
    assert torch.equal(segment(sample), reference(sample))


def test_evaluate_reports_held_out_metrics_of_saved_weights(trained):
    base = trained["base"]
    result = cli("evaluate", VERTICAL, "--weights", trained["weights"], "--free-ports", "--summary-json",
                 base / "eval.json", "--run-dir", base / "evaluate", "--timeout", "120")
    assert result.exit_code == 0, result.output
    summary = json.loads((base / "eval.json").read_text())
    assert summary["steps"] == 0 and summary["samples"] == 0  # nothing trained
    ev = summary["tasks"]["cancer"]["eval"]
    assert ev["samples"] == len(trained["y"])
    matrix = np.array(ev["confusion_matrix"])
    assert matrix.sum() == len(trained["y"]) and matrix.shape == (2, 2)
    assert ev["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    from sklearn.metrics import f1_score, roc_auc_score
    from meshsl.apps.export import assemble, load_assembled
    exports = [base / f"export_{n}" for n in ("hospital_a", "hospital_b", "lab")]
    if not all(e.exists() for e in exports):
        from meshsl.apps.export import export_node
        for node, e in zip(("hospital_a", "hospital_b", "lab"), exports):
            export_node(trained["topology"], trained["weights"], node, e)
    model = load_assembled(assemble(trained["topology"], exports, base / "eval_model.pt"))
    x = torch.from_numpy(trained["x"])
    probs = model.predict_proba({"features_a": x[:, :15], "features_b": x[:, 15:]})["cancer"].numpy()
    pred = probs.argmax(1)
    assert ev["accuracy"] == pytest.approx((pred == trained["y"]).mean())
    assert ev["f1"] == pytest.approx(f1_score(trained["y"], pred))
    assert ev["auroc"] == pytest.approx(roc_auc_score(trained["y"], probs[:, 1]), abs=1e-6)


def test_offline_party_is_named(trained, tmp_path):
    base = trained["base"]
    with pytest.raises(PartyOffline, match="hospital_b") as caught:
        predict_local(VERTICAL, trained["weights"], {"hospital_a": base / "hospital_a.csv",
                                                     "hospital_b": base / "hospital_b.npy"},
                      tmp_path / "out", remote=("hospital_b",), free_ports=True, startup_timeout=3.0,
                      run_dir=tmp_path / "run", timeout=120)
    assert "hospital-b" in str(caught.value)  # its party, too
    assert not (tmp_path / "out" / "cancer.csv").exists() or \
        len((tmp_path / "out" / "cancer.csv").read_text().splitlines()) <= 1


def test_wrong_column_count_names_node_and_file(trained, tmp_path):
    bad = tmp_path / "b_bad.npy"
    np.save(bad, trained["x"][:, 14:])  # 16 columns, hospital_b holds 15
    result = cli("predict", VERTICAL, "--weights", trained["weights"], "--input",
                 f"hospital_a={trained['base'] / 'hospital_a.csv'}", "--input", f"hospital_b={bad}",
                 "--output", tmp_path / "out", "--free-ports")
    assert result.exit_code == 1
    assert "hospital_b" in result.output and str(bad) in result.output and "16 columns" in result.output
    assert "Traceback" not in result.output
    short = tmp_path / "a_short.csv"
    np.savetxt(short, trained["x"][:50, :15], delimiter=",")
    with pytest.raises(DataError, match="not aligned"):
        predict_local(VERTICAL, trained["weights"], {"hospital_a": short,
                                                     "hospital_b": trained["base"] / "hospital_b.npy"},
                      tmp_path / "out")
    with pytest.raises(ConfigError, match="hospital_b"):
        predict_local(VERTICAL, trained["weights"], {"hospital_a": short}, tmp_path / "out")


# ---- in-process: ownership of predictions, many clients, evaluation without training -------------
async def _predict_inprocess(topology, inputs: dict, outputs: dict, hook=None) -> dict:
    from meshsl.apps.predict import NodeInference, PredictSettings
    from meshsl.coordinator.runtime import RunOptions
    from meshsl.launch.entry import run_node
    from meshsl.transport.inprocess import InProcessHub, InProcessTransport
    book = {name: f"inproc://predict-{id(inputs)}-{name}" for name in topology.nodes}
    hub = InProcessHub()
    results = {}

    async def one(name: str) -> None:
        transport = InProcessTransport(name, book[name], book, hub=hub)
        transport.sent_hook = hook
        options = RunOptions(predict=PredictSettings(batch_size=24)) if name == topology.coordinator else None
        inference = NodeInference(input_path=inputs.get(name), output_dir=outputs.get(name))
        runtime, summary = await run_node(topology, name, options, transport=transport, metrics=None,
                                          inference=inference)
        assert not runtime.failure, runtime.failure
        results[name] = summary

    async with asyncio.TaskGroup() as group:
        for name in topology.nodes:
            group.create_task(one(name))
    return results[topology.coordinator]


def test_predictions_stay_with_each_task_owner(tmp_path):
    """multi_task: the lab coordinates and owns `digit`; the insurer owns `parity`. Each writes its own
    file into its own folder, and no message to anyone carries a prediction."""
    topology = load_topology(ROOT / "topologies" / "multi_task.yaml")
    table = load_dataset(topology.data["pixels"].dataset, topology.base_dir)
    np.save(tmp_path / "pixels.npy", table.features[:100])
    sent = []

    def hook(sender, peer, frames):
        envelope, _ = decode_message(frames, 1 << 30)
        sent.append((sender, peer, envelope))

    outputs = {"lab": tmp_path / "lab", "insurer": tmp_path / "insurer"}
    summary = asyncio.run(_predict_inprocess(topology, {"clinic": tmp_path / "pixels.npy"}, outputs, hook))
    assert [p.name for p in (tmp_path / "lab").iterdir()] == ["digit.csv"]
    assert [p.name for p in (tmp_path / "insurer").iterdir()] == ["parity.csv"]
    digit, parity = load_predictions(tmp_path / "lab" / "digit.csv"), load_predictions(tmp_path / "insurer" / "parity.csv")
    assert len(digit["row"]) == len(parity["row"]) == 100 and "prob_9" in digit and "prob_1" in parity
    done = [(s, e.meta) for s, p, e in sent if e.kind == Kind.DONE]
    assert {s for s, _ in done} == set(topology.nodes)
    assert all("predictions" not in meta for _, meta in done)
    assert sum(meta["predicted"].get("parity", 0) for s, meta in done if s == "insurer") == 100
    assert all(e.kind not in (Kind.GRADIENT,) for _, _, e in sent)  # forward only
    activations = {(s, p) for s, p, e in sent if e.kind == Kind.ACTIVATION}
    assert activations == {("clinic", "cloud"), ("cloud", "lab"), ("cloud", "insurer")}
    assert summary["tasks"]["parity"]["owners"] == ["insurer"]


def test_multi_client_predictions_carry_the_client(tmp_path):
    """SplitFed: two of four clinics predict their own rows; the server (task owner) tags each row."""
    topology = load_topology(ROOT / "topologies" / "splitfed.yaml")
    table = load_dataset(topology.data["pixels"].dataset, topology.base_dir)
    np.save(tmp_path / "c0.npy", table.features[:30])
    np.save(tmp_path / "c2.npy", table.features[30:70])
    summary = asyncio.run(_predict_inprocess(
        topology, {"clinic0": tmp_path / "c0.npy", "clinic2": tmp_path / "c2.npy"}, {"server": tmp_path / "out"}))
    assert summary["rows"] == {"clinic0": 30, "clinic2": 40}
    rows = load_predictions(tmp_path / "out" / "digit.csv")
    assert rows["client"].tolist() == ["clinic0"] * 30 + ["clinic2"] * 40
    assert rows["row"].tolist() == list(range(30)) + list(range(40))


def test_evaluation_only_run_reports_per_client_metrics():
    from meshsl.coordinator.runtime import RunOptions
    from meshsl.launch.simulate import simulate
    topology = load_topology(ROOT / "topologies" / "splitfed.yaml")
    summary, runtimes = asyncio.run(simulate(topology, RunOptions(steps=0)))
    assert summary["steps"] == 0 and summary["samples"] == 0
    ev = summary["tasks"]["digit"]["eval"]
    assert sorted(ev["by_client"]) == ["clinic0", "clinic1", "clinic2", "clinic3"]
    held_out = len(sample_pools(topology).test)
    assert all(c["samples"] == held_out for c in ev["by_client"].values())
    assert all(len(c["confusion_matrix"]) >= 2 for c in ev["by_client"].values())
    from meshsl.compute.worker import build_module
    initial = build_module(topology, "top").state_dict()
    assert all(torch.equal(v, initial[k]) for k, v in runtimes["server"].worker.modules["top"].state_dict().items())
