"""Accuracy cost of latency hiding (`training.staleness`, docs/wan.md): held-out accuracy of the 5-party
chain (topologies/multi_hop.yaml, M = 8, 1F1B, batch 64, the WAN benchmark's setting) trained with
staleness k against synchronous training (k = 0), the same epochs and seed, on digits and on breast
cancer (the same chain with breast cancer's 30 measurements and 2 classes). The weights do not depend on
timing, so they are the weights a run between sites gives.

    python -m benchmarks.staleness_accuracy [--staleness 0 4 8 12] [--seeds 0 1 2] [--out runs/acc.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STALENESS = (0, 4, 8, 12)


def chain_document(dataset: str, staleness: int, seed: int) -> dict:
    document = yaml.safe_load((ROOT / "topologies" / "multi_hop.yaml").read_text())
    if dataset == "breast_cancer":
        document["name"] = "multi-hop-breast-cancer"
        document["data"] = [{"name": "x", "node": "clinic", "dataset": {"name": "breast_cancer"}},
                            {"name": "y", "node": "lab", "dataset": {"name": "breast_cancer"}, "kind": "labels"}]
        document["segments"][0]["inputs"] = ["x"]
        document["segments"][0]["layers"][0] = ["Linear", 30, 96]
        document["segments"][-1]["layers"][-1] = ["Linear", 48, 2]
        document["tasks"] = [{"name": "diagnosis", "output": "stage_4", "labels": "y", "metrics": ["accuracy"]}]
    document["training"].update(staleness=staleness, seed=seed)
    return document


def accuracy(dataset: str, staleness: int, seed: int) -> float:
    """Trained by the unsplit reference of the same rule (tests/integration/test_staleness.py checks the split run equals
    it), evaluated on the held-out rows the nodes evaluate on: minutes faster than simulating the nodes."""
    import numpy as np
    import torch
    from meshsl.compute.node_data import NodeData
    from meshsl.compute.worker import build_module
    from meshsl.config.loader import parse_spec
    from meshsl.schedule.steps import sample_pools
    from meshsl.apps.reference import train_reference
    from meshsl.topology.model import topology_from_spec
    topology = topology_from_spec(parse_spec(chain_document(dataset, staleness, seed)), "<bench>", ROOT)
    weights, _ = train_reference(topology)
    data = {}
    for node in topology.nodes:
        data.update(NodeData(topology, node).tensors)
    rows = torch.as_tensor(np.asarray(sample_pools(topology).test))
    (task,) = topology.spec.tasks
    features = next(d.name for d in topology.spec.data if d.kind != "labels")
    x, y = data[features][rows], data[task.labels][rows].reshape(-1).long()
    with torch.no_grad():
        for name in topology.segment_order:
            module = build_module(topology, name)
            module.load_state_dict(weights[name])
            x = module(x)
    return float((x.argmax(dim=1) == y).float().mean())


def measure(staleness=DEFAULT_STALENESS, seeds=(0, 1, 2), datasets=("digits", "breast_cancer")) -> dict:
    rows = []
    for dataset in datasets:
        for k in staleness:
            values = []
            for seed in seeds:
                values.append(accuracy(dataset, k, seed))
                print(f"{dataset} staleness {k} seed {seed}: {values[-1]:.4f}", file=sys.stderr, flush=True)
            rows.append({"dataset": dataset, "staleness": k, "accuracy": values, "mean": statistics.fmean(values)})
    for row in rows:
        sync = next(r for r in rows if r["dataset"] == row["dataset"] and r["staleness"] == 0)
        row["points_vs_sync"] = round(100 * (row["mean"] - sync["mean"]), 2)
    return {"topology": "multi_hop.yaml (M=8, 1f1b, batch 64, 6 epochs)", "seeds": list(seeds), "rows": rows}


def table(result: dict) -> str:
    lines = [f"latency hiding, held-out accuracy ({result['topology']}; mean of seeds {result['seeds']})",
             "dataset | staleness | accuracy (mean) | per seed | points vs k=0"]
    for r in result["rows"]:
        lines.append(f"{r['dataset']} | {r['staleness']} | {100 * r['mean']:.2f}% | "
                     + ", ".join(f"{100 * a:.2f}" for a in r["accuracy"]) + f" | {r['points_vs_sync']:+.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.staleness_accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--staleness", type=int, nargs="+", default=list(DEFAULT_STALENESS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=["digits", "breast_cancer"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if 0 not in args.staleness:
        args.staleness.insert(0, 0)
    result = measure(args.staleness, args.seeds, args.datasets)
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
