"""Smoke tests of the benchmark suite: every section of `python -m benchmarks` (benchmarks/__main__.py: SECTIONS
and OPTIONAL) runs here at its smoke size (`measure(smoke=True)`, `python -m benchmarks --smoke`: the tiniest
sizes, one repetition, a few costly parts left out), so that none breaks unseen; each result is checked for
its structure and for sane values (finite positive throughputs, timings and memory) and rendered by the
runner's table. What needs what this machine lacks skips naming it (gpu: CUDA, its CPU path still runs; wan
and bank: root, `ip`, `nft`; llm: transformers and peft; secretflow: its own venv, its meshsl half runs
alone). Also the pinned-memory staging helper (its CUDA half skips without a GPU)."""
import json
import math
import os

import pytest
import torch

from benchmarks import scale
from benchmarks.__main__ import OPTIONAL, SECTIONS, main, table
from meshsl.compute.staging import to_device, to_host

pytestmark = pytest.mark.timeout(600)


def _positive(*values) -> bool:
    """Every value a finite number above zero."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values)


def test_every_section_has_a_smoke_test():
    """A section added to the runner without its smoke test here fails this."""
    tested = {name[len("test_smoke_"):] for name in globals() if name.startswith("test_smoke_")}
    assert set(SECTIONS + OPTIONAL) <= tested, set(SECTIONS + OPTIONAL) - tested


def test_smoke_transport():
    from benchmarks import transport
    streams, rtt = transport.measure(smoke=True)
    assert streams["size_bytes"] == 64 << 10 and rtt["size_bytes"] == 4 << 10
    assert _positive(streams["raw_push_pull_MBps"], streams["raw_dealer_router_MBps"], streams["meshsl_MBps"],
                     streams["ratio_vs_push_pull"], streams["ratio_vs_dealer_router"])
    assert _positive(rtt["raw_rtt_us"], rtt["meshsl_rtt_us"], rtt["ratio"])
    assert rtt["meshsl_rtt_us"] <= rtt["meshsl_rtt_us_p99"]
    text = table({"transport": [streams, rtt]})
    assert "64 KiB" in text and "round trip 4 KiB" in text


def test_smoke_pipelining():
    from benchmarks import pipelining
    result = pipelining.measure(smoke=True)
    (row,) = result["pipelining"]
    assert (row["stages"], row["micro_batches"], row["schedule"], row["batch"]) == (2, 2, "gpipe", 64)
    assert _positive(row["samples_per_s"], row["gpipe_ideal"], row["attainable"]) and row["speedup_vs_m1"] is None
    assert set(row["peak_rss_mib"]) == {"n0", "n1"} and _positive(*row["peak_rss_mib"].values())
    assert row["gpipe_ideal"] == pytest.approx(4 / 3)  # M=2 over 2 stages: 4 slots of 3
    assert set(result["micro_batch_efficiency"]) == {2} and _positive(*result["micro_batch_efficiency"].values())
    (peer,) = result["vs_torch_pipelining"]
    assert peer["case"] == "2 stages M=2 gpipe" and _positive(peer["meshsl"], peer["torch_pipelining"], peer["ratio"])
    assert result["vs_one_process"] == []  # (not in a smoke run)
    text = table({"pipelining": result})
    assert "2 stages M=2 gpipe" in text and "vs torch.distributed.pipelining" in text


def test_smoke_scale():
    result = scale.measure(smoke=True)
    (hop,) = result["hops"]
    assert hop["hops"] == 2 and hop["relative_to_2_hops"] == 1.0
    assert _positive(hop["samples_per_s"], hop["peak_rss_mib_max_node"], hop["peak_rss_mib_total"])
    (client,) = result["clients_simulated"]  # (smoke: simulated in this process)
    assert client["clients"] == 4 and client["logical_nodes"] == 5 and client["steps"] == 2
    assert _positive(client["samples_per_s"], client["wall_s"], client["peak_rss_mib"], client["loss"])
    assert all("error" in r for r in result["clients_on_ray"])  # smoke: no Ray cluster (at most: not installed)
    text = table({"scale": result, "gpu": {"skipped": "no CUDA"}})
    assert "SplitFed clients" in text and "no CUDA" in text


def test_smoke_startup():
    """The start-up section waits for every node's first-step log line (it crashed once the step protocol
    stopped logging it: issue 30)."""
    from benchmarks import startup
    result = startup.measure(smoke=True)
    assert result["runs"] == 1 and set(result["first_step_s"]) == {"client", "server"}
    assert all(0 < s < result["whole_run_s"] for s in result["first_step_s"].values())
    assert _positive(result["python_import_torch_s"], result["first_step_over_import_torch"])
    assert result["with_dynamo_and_rich_first_step_s"] is None  # (the start-up of before: not in a smoke run)
    assert {"import torch", "load + check topology", "total"} <= set(result["breakdown_s"])
    assert result["torch_dynamo_imported"] is False  # what the start-up work took away must stay away
    assert "`meshsl node server`" in table({"startup": result})


def test_smoke_gpu():
    """The GPU section's code path (unsplit process, a 2-node split ResNet, ratio, table) with a narrow
    ResNet: on CUDA where there is one, else on CPU, and then the GPU figures are skipped naming why."""
    from benchmarks import gpu
    result = gpu.measure(smoke=True)
    figures = result if torch.cuda.is_available() else result["cpu"]
    (row,) = figures["split"]
    assert (row["parts"], row["micro_batches"], row["schedule"], row["steps"]) == (2, 2, "1f1b", 2)
    assert math.isfinite(row["loss"]) and 0 < row["loss"] < 10 and set(row["peak_rss_mib"]) == {"n0", "n1"}
    assert _positive(row["samples_per_s"], row["ratio_vs_unsplit"], *row["cut_floats_per_sample"])
    single = figures["unsplit"]
    assert _positive(single["samples_per_s"]) and math.isfinite(single["loss"]) and single["steps"] == 3
    assert figures["unsplit_again"] is None  # (the drift check: not in a smoke run)
    shown = figures if torch.cuda.is_available() else {**figures, "d2h_pageable_ms": 2.0, "d2h_pinned_ms": 1.0,
                                                       "speedup": 2.0}
    text = table({"gpu": shown})
    assert "meshsl 2 nodes M=2 1f1b" in text and f"{row['ratio_vs_unsplit']:.2f}" in text
    if not torch.cuda.is_available():
        assert result["skipped"] == "no CUDA device on this machine" and "no CUDA" in table({"gpu": result})
        pytest.skip("no CUDA device: the GPU figures (chains on cuda, pinned copies) were not measured; "
                    "their code path ran on CPU")
    assert _positive(result["d2h_pageable_ms"], result["d2h_pinned_ms"], result["speedup"])


def test_smoke_wan():
    """Two emulated sites (network namespaces, nft redirects, delay proxies): meshsl at RTT 0 and 20 ms, a
    few steps each; the round trips per step come from the difference."""
    from benchmarks import wan
    if wan.unavailable():
        pytest.skip(f"wan: {wan.unavailable()}")
    result = wan.measure(smoke=True)
    assert set(result["echo_rtt_ms"]) == {0.0, 20.0} and result["echo_rtt_ms"][20.0] > result["echo_rtt_ms"][0.0]
    rows = {(r["system"], r["rtt_ms"]): r for r in result["rows"]}
    assert set(rows) == {("meshsl", 0.0), ("meshsl", 20.0)}
    for row in rows.values():
        assert _positive(row["ms_per_step"], row["median_ms_per_step"]) and row["topology"] == "vanilla"
    delayed = rows[("meshsl", 20.0)]
    assert delayed["bound"] == 1 and math.isfinite(delayed["round_trips_per_step"])
    assert 0 < delayed["throughput_vs_no_delay"] <= 2
    assert "between sites" in wan.table(result) and "between sites" in table({"wan": result})


def test_smoke_psi(tmp_path, capsys):
    """`python -m benchmarks --smoke --only psi --out X`: 400 ids per party, openmined-psi's own flow and
    meshsl's alignment between two processes find the same 70 %; the runner prints the table, writes JSON."""
    pytest.importorskip("private_set_intersection")
    out = tmp_path / "bench.json"
    assert main(["--smoke", "--only", "psi", "--out", str(out)]) == 0
    assert "400 ids per party" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["smoke"] is True and set(written["seconds"]) == {"psi"}
    (row,) = written["psi"]
    assert row["ids_per_party"] == 400 and row["common"] == 280
    assert _positive(row["library_wall_s"], row["meshsl_wall_s"], row["ratio_wall"], row["library_bytes"])


def test_smoke_secretflow():
    """SecretFlow lives in its own venv (never in CI): its half is not run, and the section says why; the
    meshsl half (`meshsl run` of vanilla.yaml, 2 epochs) runs alone, summarised and tabled as usual."""
    from benchmarks import secretflow_compare as sfc
    result = sfc.measure(smoke=True)
    configured = bool(os.environ.get(sfc.ENV_VAR, "").strip())
    assert "not run in smoke mode" in result["secretflow"] if configured else sfc.ENV_VAR in result["secretflow"]
    (row,) = result["rows"]
    assert row["case"] == "vanilla" and row["rounds"] == 1 and not row["errors"], row["errors"]
    mine = row["meshsl"]
    assert _positive(mine["samples_per_s"], mine["steady_samples_per_s"], mine["wall_s"], mine["peak_rss_sum_mib"],
                     mine["peak_pss_sum_mib"], mine["cpu_s"])
    assert mine["processes"] >= 3 and 0.5 < mine["accuracy"] <= 1  # `meshsl run` and its two nodes; digits learnt
    assert row["secretflow"]["samples_per_s"] is None and row["speedup_samples_per_s"] is None
    assert "vanilla.yaml (digits)" in table({"secretflow": result})


def test_smoke_bank():
    """`python -m benchmarks --only bank` in miniature: generated vertical Parquet and CSV tables, the load
    comparison against pyarrow, training behind emulated 100 Mbit/s 50 ms links, prediction of the
    training rows, and the same model in the clear (issue 25; the full shape is in docs/performance.md)."""
    from benchmarks import bank
    from benchmarks.wan import unavailable
    if unavailable():
        pytest.skip(f"bank: {unavailable()}")
    result = bank.measure(smoke=True)
    (row,) = result["rows"]
    assert (row["parties"], row["rows"], row["features"], row["epochs"]) == (2, 6_000, 40, 2)
    assert [r["format"] for r in row["load"]] == ["parquet", "csv"]
    assert all(r["within_memory_bound"] and _positive(r["meshsl_s"], r["pyarrow_s"]) for r in row["load"])
    assert row["auc_split"] > 0.7 and abs(row["auc_gap"]) < 0.05  # the split model learns what the clear one does
    assert _positive(row["wire_mib_per_epoch"], row["train_s"], row["samples_per_s"], row["echo_rtt_ms"])
    assert row["predict_rounds_s"] <= row["predict_s"] and "out_of_core" not in result
    assert "2 x 6,000 x 40" in bank.table(result) and "2 x 6,000 x 40" in table({"bank": result})


def test_smoke_llm():
    """`python -m benchmarks --only llm` at its smoke size: the unsplit peft baseline and the U-shaped split
    at M=4 with bf16 on the wire over real node processes: tokens/s, peak memory, wire bytes per token."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from benchmarks import llm
    result = llm.measure(smoke=True)
    (split,) = result["rows"]
    assert split["case"] == "split M=4, bf16 on the wire" and result["steps"] == 4
    assert _positive(split["unsplit_tokens_per_s"], split["unsplit_peak_rss_mib"], split["tokens_per_s"],
                     split["ratio_vs_unsplit"], *split["peak_rss_mib"].values())
    assert set(split["peak_rss_mib"]) == {"clinic", "cloud"} and math.isfinite(split["train_loss"])
    assert split["wire_bytes_per_token"] >= 2 * 64 * 2 * 2  # bf16 hidden states of width 64, 2 edges, both ways
    assert "x unsplit" in llm.table(result) and "bf16 on the wire" in table({"llm": result})


def test_smoke_mode_leaves_quick_alone(monkeypatch):
    """`--quick` calls each section as before (`measure(quick=True)`, no smoke argument); `--smoke` adds it."""
    import benchmarks.psi as psi
    calls = []
    monkeypatch.setattr(psi, "measure", lambda **kwargs: calls.append(kwargs) or [])
    monkeypatch.setattr(psi, "table", lambda rows: "")
    assert main(["--quick", "--only", "psi"]) == 0 and main(["--smoke", "--only", "psi"]) == 0
    assert calls == [{"quick": True}, {"quick": False, "smoke": True}]


def test_staging_leaves_cpu_tensors_alone():
    x = torch.randn(4, 3)
    assert to_host(x).data_ptr() == x.data_ptr()
    assert to_device(x, torch.device("cpu")) is x


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_staging_round_trip_on_cuda():
    x = torch.randn(64, 128)
    on_gpu = to_device(x, torch.device("cuda"))
    assert on_gpu.is_cuda
    back = to_host(on_gpu * 2)
    assert back.is_pinned() and torch.equal(back, x * 2)

