"""Privacy tables: what each privacy/compression setting costs and what it hides.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/privacy_table.py [--table input|labels|both]
                                                                   [--epochs 6] [--json out.json]

`input` (the digits table): every row trains topologies/vanilla.yaml (with one `privacy:` entry or
`training.label_dp` added) through the real runtime, all nodes in one process, then audits the cut
edge on the held-out rows: dCor(raw pixels, what crosses the wire), the inversion probe's error
relative to guessing the mean, the clustering label attack on the gradients sent back (10 classes:
accuracy against the majority share), and epsilon (Opacus RDP accountant) where a row declares DP.
Bytes per sample are whole messages (JSON header included), forward + backward, from the summary.

`labels` (binary labels): utility against label-attack AUC on breast cancer
(topologies/vanilla_breast_cancer.yaml) and on digits parity (the vanilla digits topology with odd/even
labels), for each label-leakage defence: the norm and cosine attacks' AUC on the gradients of every
row at the final model (0.5 chance), the live norm-attack gauge's last reading, test accuracy and AUROC.
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

INPUT_SETTINGS = [
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

LABEL_SETTINGS = [
    ("none", None, None),
    ("max_norm", {"defence": "max_norm"}, None),
    ("marvell s=0.25", {"defence": "marvell", "strength": 0.25}, None),
    ("marvell s=1", {"defence": "marvell", "strength": 1.0}, None),
    ("marvell s=4", {"defence": "marvell", "strength": 4.0}, None),
    ("gradient DP eps 8 (clip 1)", {"defence": "dp", "clip_norm": 1.0, "target_epsilon": 8.0}, None),
    ("gradient DP eps 1 (clip 1)", {"defence": "dp", "clip_norm": 1.0, "target_epsilon": 1.0}, None),
    ("label DP eps 2", None, {"epsilon": 2.0}),
    ("label DP eps 0.5", None, {"epsilon": 0.5}),
]


def build(doc: dict, source: str):
    from meshsl.config.loader import parse_spec
    from meshsl.topology.model import topology_from_spec
    for node in doc["nodes"]:
        node.pop("metrics_port", None)
    return topology_from_spec(parse_spec(doc), source, ROOT / "topologies")


def digits_topology(privacy: dict, label_dp, epochs: int):
    doc = yaml.safe_load((ROOT / "topologies" / "vanilla.yaml").read_text())
    doc["privacy"] = [dict(privacy, segment="bottom")] if privacy else []
    doc["training"].update(epochs=epochs, label_dp=label_dp)
    return build(doc, "topologies/vanilla.yaml")


def binary_topology(dataset: str, gradient, label_dp, epochs: int | None):
    if dataset == "breast_cancer":
        doc = yaml.safe_load((ROOT / "topologies" / "vanilla_breast_cancer.yaml").read_text())
    else:  # digits parity: the digits topology with odd/even labels and a two-class head
        doc = yaml.safe_load((ROOT / "topologies" / "vanilla.yaml").read_text())
        doc["data"][1]["dataset"] = {"name": "factory", "options": {"target": "meshsl.data.derived:digits_parity"}}
        doc["segments"][1]["layers"][-1] = ["Linear", 64, 2]
        doc["tasks"][0]["metrics"] = ["accuracy", "auroc"]
    if epochs is not None:
        doc["training"]["epochs"] = epochs
    doc["privacy"] = [{"segment": "bottom", "gradient": gradient}] if gradient else []
    doc["training"]["label_dp"] = label_dp
    return build(doc, f"{dataset}-vanilla")


def epsilon_of(topology, steps: int) -> float | None:
    from meshsl.schedule.accounting import budget
    if not topology.spec.privacy and topology.spec.training.label_dp is None:
        return None
    values = [e["epsilon"] for e in budget(topology, steps)["edges"]]
    if topology.spec.training.label_dp is not None:
        values.append(topology.spec.training.label_dp.epsilon)
    return min(values) if values else None


def input_table(epochs: int) -> list[dict]:
    from meshsl.apps.audit import audit
    rows = []
    for name, privacy, label_dp in INPUT_SETTINGS:
        started = time.perf_counter()
        topology = digits_topology(privacy, label_dp, epochs)
        report = audit(topology)
        edge = report["edges"]["bottom->top"]
        labels = report["label_edges"]["bottom->top"]["tasks"]["digit"]
        rows.append({"setting": name, "accuracy": report["trained"]["eval"]["digit"]["accuracy"],
                     "bytes_per_sample": report["trained"]["bytes_per_sample"]["bottom->top"],
                     "dcor": edge["dcor"], "inversion_relative_error": edge["inversion_relative_error"],
                     "label_cluster_accuracy": labels["cluster_accuracy"], "label_chance": labels["chance_accuracy"],
                     "epsilon": epsilon_of(topology, report["trained"]["steps"]),
                     "live_dcor": report["trained"]["live_leakage"].get("bottom->top"),
                     "seconds": time.perf_counter() - started})
        print(f"{name}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def label_table(epochs: int | None) -> list[dict]:
    from meshsl.apps.audit import audit_labels, train_modules
    rows = []
    for dataset, task in (("breast_cancer", "diagnosis"), ("digits_parity", "digit")):
        for name, gradient, label_dp in LABEL_SETTINGS:
            started = time.perf_counter()
            topology = binary_topology(dataset, gradient, label_dp, epochs)
            modules, summary = train_modules(topology)
            attacks = audit_labels(topology, modules)["bottom->top"]["tasks"][task]
            evaluation = summary["tasks"][task]["eval"]
            rows.append({"dataset": dataset, "setting": name, "accuracy": evaluation["accuracy"],
                         "auroc": evaluation.get("auroc"), "norm_auc": attacks["norm_auc"],
                         "cosine_auc": attacks["cosine_auc"], "cluster_accuracy": attacks["cluster_accuracy"],
                         "chance_accuracy": attacks["chance_accuracy"],
                         "live_norm_auc": summary.get("label_leakage", {}).get("bottom->top"),
                         "epsilon": epsilon_of(topology, summary["steps"]), "steps": summary["steps"],
                         "seconds": time.perf_counter() - started})
            print(f"{dataset} {name}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def _f(value, pattern: str = "{:.3f}") -> str:
    return "-" if value is None else pattern.format(value)


def print_input(rows: list[dict]) -> None:
    print("| setting | test accuracy | bytes/sample (fwd+bwd) | dCor (held-out) | inversion error (rel.) | "
          "label attack: cluster acc. (chance) | epsilon |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['accuracy']:.3f} | {r['bytes_per_sample']:.0f} | {r['dcor']:.3f} | "
              f"{r['inversion_relative_error']:.3f} | {r['label_cluster_accuracy']:.3f} ({r['label_chance']:.3f}) | "
              f"{_f(r['epsilon'], '{:.3g}')} |")


def print_labels(rows: list[dict]) -> None:
    print("| dataset | defence | test accuracy | test AUROC | norm-attack AUC | cosine-attack AUC | "
          "live norm AUC | epsilon (labels) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dataset']} | {r['setting']} | {r['accuracy']:.3f} | {_f(r['auroc'])} | {r['norm_auc']:.3f} | "
              f"{r['cosine_auc']:.3f} | {_f(r['live_norm_auc'])} | {_f(r['epsilon'], '{:.3g}')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=("input", "labels", "both"), default="both")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: 6 for digits, each topology's own for the label table)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = {}
    if args.table in ("input", "both"):
        result["input"] = input_table(args.epochs or 6)
        print_input(result["input"])
    if args.table in ("labels", "both"):
        result["labels"] = label_table(args.epochs)
        print()
        print_labels(result["labels"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
