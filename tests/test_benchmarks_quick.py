"""Smoke test of the benchmark suite: tiny sizes of the transport and simulated-scale comparisons, the
table, and the pinned-memory staging helper (its CUDA half skips without a GPU)."""
import pytest
import torch

from benchmarks import scale, transport
from benchmarks.__main__ import table
from meshsl.compute.staging import to_device, to_host


def test_transport_comparison_moves_real_bytes():
    raw = transport._one("raw", "push", 64 << 10, 0.3, 0)
    mine = transport._one("meshsl", "stream", 64 << 10, 0.3, 0)
    assert raw["messages"] > 0 and raw["MBps"] > 0
    assert mine["messages"] > 0 and mine["MBps"] > 0
    rtt = transport._one("meshsl", "rtt", 4 << 10, 0, 20)
    assert 0 < rtt["rtt_us_median"] <= rtt["rtt_us_p99"]


def test_simulated_splitfed_and_table():
    row = scale.simulate_splitfed(clients=4, steps=2)
    assert row["logical_nodes"] == 5 and row["steps"] == 2 and row["samples_per_s"] > 0
    text = table({"scale": {"hops": [], "clients_simulated": [row]}, "gpu": {"skipped": "no CUDA"}})
    assert "SplitFed clients" in text and "no CUDA" in text


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


def test_bank_benchmark_at_a_scaled_down_shape():
    """`python -m benchmarks --only bank` in miniature: generated vertical Parquet and CSV tables, the load
    comparison against pyarrow, training behind emulated 100 Mbit/s 50 ms links, prediction of the
    training rows, and the same model in the clear (issue 25; the full shape is in docs/performance.md)."""
    from benchmarks import bank
    from benchmarks.wan import unavailable
    if unavailable():
        pytest.skip(unavailable())
    result = bank.measure(quick=True, shapes=[(2, 6_000, 40)], epochs=2, batch_size=512, repeats=1,
                          out_of_core_shape=None)
    row = result["rows"][0]
    assert [r["format"] for r in row["load"]] == ["parquet", "parquet", "csv"]
    assert all(r["within_memory_bound"] for r in row["load"])
    assert row["auc_split"] > 0.7 and abs(row["auc_gap"]) < 0.05  # the split model learns what the clear one does
    assert row["wire_mib_per_epoch"] > 0 and row["predict_rounds_s"] <= row["predict_s"]
    assert "2 x 6,000 x 40" in bank.table(result)


def test_startup_benchmark_finds_each_nodes_first_step():
    """`python -m benchmarks --only startup` waits for every node's first-step log line (it crashed once the
    step protocol stopped logging it: issue 30)."""
    from benchmarks.startup import node_processes
    result = node_processes(steps=2)
    assert set(result["first_step_s"]) == {"client", "server"}
    assert all(0 < s < result["whole_run_s"] for s in result["first_step_s"].values())


def test_llm_benchmark_in_miniature():
    """`python -m benchmarks --only llm` at its quick size, one split case: the unsplit peft baseline and the
    U-shaped split at M=4 over real node processes, with tokens/s, peak memory and wire bytes per token."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from benchmarks import llm
    result = llm.measure(quick=True, micro_batches=(4,), codecs=())
    (split,) = result["rows"]
    assert split["unsplit_tokens_per_s"] > 0 and split["unsplit_peak_rss_mib"] > 0
    assert split["tokens_per_s"] > 0 and set(split["peak_rss_mib"]) == {"clinic", "cloud"}
    assert result["m4_ratio_median"] == split["ratio_vs_unsplit"] > 0
    assert split["wire_bytes_per_token"] >= 4 * 64 * 2 * 2  # fp32 hidden states of width 64, 2 edges, both ways
    assert "x unsplit" in llm.table(result)
