"""Label leakage on the wire, per training phase and defence (docs/privacy.md, "Label leakage on the wire").

Trains topologies/vanilla_breast_cancer.yaml in-process once per defence, recording what the clinic receives,
and prints `meshsl audit --run`'s figures as one markdown table: realistic / upper bound per phase.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/label_trajectory.py [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from meshsl.apps.audit_trajectory import record_and_audit
from meshsl.config.loader import parse_spec
from meshsl.topology.model import topology_from_spec

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"none": None, "max_norm (floor 32)": {"defence": "max_norm"},
            "max_norm, floor 0 (before)": {"defence": "max_norm", "floor": 0.0},
            "marvell s=1 (floor 16)": {"defence": "marvell", "strength": 1.0},
            "marvell s=1, floor 0 (before)": {"defence": "marvell", "strength": 1.0, "floor": 0.0},
            "gradient DP eps 8 (clip 1)": {"defence": "dp", "clip_norm": 1.0, "target_epsilon": 8.0},
            "gradient DP eps 1 (clip 1)": {"defence": "dp", "clip_norm": 1.0, "target_epsilon": 1.0}}
PHASES = ["steps 0-4", "steps 5-14", "epoch 0", "epoch 1", "epoch 2", "epoch 3", "epoch 4", "all steps"]


def topology(gradient):
    path = ROOT / "topologies" / "vanilla_breast_cancer.yaml"
    doc = yaml.safe_load(path.read_text())
    if gradient is not None:
        doc["privacy"] = [{"segment": "bottom", "gradient": gradient}]
    return topology_from_spec(parse_spec(doc), str(path), path.parent)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    print("| defence | accuracy | AUROC | attack | " + " | ".join(PHASES) + " |")
    print("|---|---:|---:|---|" + "---:|" * len(PHASES))
    for name, gradient in SETTINGS.items():
        with tempfile.TemporaryDirectory() as directory:
            document, summary = record_and_audit(topology(gradient), Path(directory))
        report = document["label_edges"]["bottom->top"]["tasks"]["diagnosis"]
        evaluation = summary["tasks"]["diagnosis"]["eval"]
        results[name] = {"eval": evaluation, "phases": report["phases"]}
        for attack in ("norm_auc", "direction_auc"):
            cells = [f"{report['phases'][p]['realistic'][attack]:.2f} / {report['phases'][p]['upper_bound'][attack]:.2f}"
                     for p in PHASES]
            print(f"| {name} | {evaluation['accuracy']:.3f} | {evaluation['auroc']:.3f} | {attack[:-4]} | "
                  + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
