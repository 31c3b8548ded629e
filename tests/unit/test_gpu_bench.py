"""The GPU benchmark's model, topology and code path: the hand-written ResNet-18 (CIFAR variant), its
near-equal-FLOP cuts and the generated factory-segment chain passing meshsl's validation. The real 2-node
split run (node processes, ZeroMQ) of a narrow ResNet on CPU is the section's smoke run
(tests/integration/test_benchmarks_quick.py::test_smoke_gpu). The full-width GPU figures run only with CUDA."""
import math

import pytest
import torch

from benchmarks import gpu
from benchmarks.__main__ import table
from benchmarks.common import topology_from_document
from benchmarks.resnet import UNITS, balanced_cuts, resnet18, segment, unit_macs, unit_output_shape


def test_resnet18_is_resnet18_sized_and_cuts_are_balanced():
    model = resnet18()
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # the CIFAR ResNet-18
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    total = sum(unit_macs())
    assert 0.55e9 < total < 0.56e9
    assert balanced_cuts(2) == [(0, 5), (5, 10)]
    assert balanced_cuts(4) == [(0, 3), (3, 5), (5, 7), (7, 10)]  # one ResNet stage per segment
    for parts in (2, 4):
        cuts = balanced_cuts(parts)
        assert cuts[0][0] == 0 and cuts[-1][1] == UNITS and all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
        costs = [sum(unit_macs()[a:b]) for a, b in cuts]
        assert max(costs) < 1.15 * total / parts
        params = sum(sum(p.numel() for p in segment(a, b).parameters()) for a, b in cuts)
        assert params == 11_173_962
    x = torch.zeros(1, 3, 32, 32)
    for i, unit in enumerate(resnet18(1 / 16).eval()):
        x = unit(x)
        assert tuple(x.shape[1:]) == unit_output_shape(i, 1 / 16)


@pytest.mark.parametrize("parts", [2, 4])
def test_generated_topology_validates_and_keeps_data_with_owners(parts):
    doc = gpu.resnet_chain_document(parts, 4, "1f1b", device="cuda")
    topology = topology_from_document(doc)  # schema, graph checks, shape inference on the factory segments
    assert all(n.device == "cuda" for n in topology.spec.nodes)
    assert topology.shapes["x"] == (3, 32, 32)
    assert topology.data["x"].node == "n0" and topology.data["y"].node == f"n{parts - 1}"
    assert topology.data["y"].kind == "labels"
    assert topology.shapes[f"s{parts - 1}"] == (10,)
    cut_shapes = [topology.shapes[f"s{i}"] for i in range(parts - 1)]
    assert [math.prod(s) for s in cut_shapes] == gpu.cut_floats_per_sample(parts)
    assert sum(info.parameters for info in topology.segment_info.values()) == 11_173_962


def test_table_prints_gpu_rows():
    unsplit = {"samples_per_s": 1000.0, "loss": 2.3, "steps": 10}
    split = [{"parts": 2, "micro_batches": 4, "schedule": "1f1b", "samples_per_s": 500.0, "ratio_vs_unsplit": 0.5,
              "cut_floats_per_sample": [32768], "peak_rss_mib": {"n0": 900.0, "n1": 950.0}}]
    text = table({"gpu": {"device_name": "Fake GPU", "batch": 256, "unsplit": unsplit, "unsplit_again": unsplit,
                          "split": split, "d2h_pageable_ms": 2.0, "d2h_pinned_ms": 1.0, "speedup": 2.0}})
    assert "2 nodes M=4 1f1b" in text and "0.50" in text and "1,000" in text and "2.00x" in text
    assert "no CUDA" in table({"gpu": {"skipped": "no CUDA device on this machine"}})


def test_measure_skips_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.measure(quick=True) == {"skipped": "no CUDA device on this machine"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_split_vs_unsplit_figures():
    result = gpu.figures("cuda", [(2, 4, "1f1b"), (4, 4, "1f1b")], batch_size=128, steps=6, warmup=2)
    assert result["unsplit"]["samples_per_s"] > 0 and result["unsplit"]["peak_gpu_mib"] > 0
    for row, parts in zip(result["split"], (2, 4)):
        assert row["parts"] == parts and row["steps"] == 6
        assert math.isfinite(row["loss"]) and row["samples_per_s"] > 0 and row["ratio_vs_unsplit"] > 0
