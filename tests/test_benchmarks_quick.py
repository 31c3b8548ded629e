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
