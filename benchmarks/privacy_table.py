"""Accuracy, wire bytes and leakage of privacy/compression settings on the vanilla digits topology.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/privacy_table.py [--epochs 6] [--json out.json]

Every row trains topologies/vanilla.yaml (with one `privacy:` entry or `training.label_dp` added)
through the real runtime, all nodes in one process, then audits the cut edge on the held-out rows:
dCor(raw pixels, what crosses the wire) and the inversion probe's error relative to guessing the mean.
Bytes per sample are whole messages (JSON header included), forward + backward, from the summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = [
    ("vanilla", {}, None),
    ("NoPeek 0.2", {"nopeek": 0.2}, None),
    ("NoPeek 0.5", {"nopeek": 0.5}, None),
    ("DP clip 1, sigma 0.5", {"dp": {"clip_norm": 1.0, "noise_multiplier": 0.5}}, None),
    ("DP clip 1, sigma 1", {"dp": {"clip_norm": 1.0, "noise_multiplier": 1.0}}, None),
    ("label DP eps 2", {}, {"epsilon": 2.0}),
    ("fp16 / bf16", {"forward": {"codec": "fp16"}, "backward": {"codec": "bf16"}}, None),
    ("int8 both ways", {"forward": {"codec": "int8"}, "backward": {"codec": "int8"}}, None),
    ("top-k 25% fwd, int8 bwd", {"forward": {"codec": "topk", "ratio": 0.25}, "backward": {"codec": "int8"}}, None),
    ("top-k 10% fwd, int8 bwd", {"forward": {"codec": "topk", "ratio": 0.1}, "backward": {"codec": "int8"}}, None),
]


def topology(privacy: dict, label_dp, epochs: int):
    from meshsl.config.loader import parse_spec
    from meshsl.topology.model import topology_from_spec
    doc = yaml.safe_load((ROOT / "topologies" / "vanilla.yaml").read_text())
    for node in doc["nodes"]:
        node.pop("metrics_port", None)
    doc["privacy"] = [dict(privacy, segment="bottom")] if privacy else []
    doc["training"].update(epochs=epochs, label_dp=label_dp)
    return topology_from_spec(parse_spec(doc), "topologies/vanilla.yaml", ROOT / "topologies")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from meshsl.audit import audit
    rows = []
    for name, privacy, label_dp in SETTINGS:
        started = time.perf_counter()
        report = audit(topology(privacy, label_dp, args.epochs))
        edge = report["edges"]["bottom->top"]
        rows.append({"setting": name, "accuracy": report["trained"]["eval"]["digit"]["accuracy"],
                     "bytes_per_sample": report["trained"]["bytes_per_sample"]["bottom->top"],
                     "dcor": edge["dcor"], "inversion_relative_error": edge["inversion_relative_error"],
                     "live_dcor": report["trained"]["live_leakage"].get("bottom->top"),
                     "seconds": time.perf_counter() - started})
        print(f"{name}: {rows[-1]}", file=sys.stderr, flush=True)
    print(f"| setting | test accuracy | bytes/sample (fwd+bwd) | dCor (held-out) | inversion error (rel.) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['accuracy']:.3f} | {r['bytes_per_sample']:.0f} | {r['dcor']:.3f} | "
              f"{r['inversion_relative_error']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
