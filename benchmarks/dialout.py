"""What dialling out costs: vertical.yaml trained by real processes over loopback with every node
accepting inbound connections, and with both hospitals dialling out (`inbound: false`), interleaved.

    python -m benchmarks.dialout --rounds 3 --epochs 10

Prints the median training samples/s of each (from the run summaries) and their ratio; the runs of one
invocation share the machine's load, so compare the ratio, not the absolute figures."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def topologies(folder: Path) -> dict[str, Path]:
    document = yaml.safe_load((ROOT / "topologies" / "vertical.yaml").read_text())
    for node in document["nodes"]:
        node.pop("metrics_port", None)
    inbound = folder / "inbound.yaml"
    inbound.write_text(yaml.safe_dump(document, sort_keys=False))
    for node in document["nodes"]:
        if node["name"] != "lab":
            node.pop("endpoint")
            node["inbound"] = False
    dial_out = folder / "dial_out.yaml"
    dial_out.write_text(yaml.safe_dump(document, sort_keys=False))
    return {"inbound": inbound, "dial-out": dial_out}


def samples_per_s(topology: Path, folder: Path, epochs: int) -> float:
    summary = folder / "summary.json"
    done = subprocess.run([sys.executable, "-m", "meshsl", "--log-level", "INFO", "run", str(topology), "--free-ports", "--no-progress",
                           "--epochs", str(epochs), "--run-dir", str(folder / "run"), "--summary-json", str(summary)],
                          capture_output=True, text=True, cwd=ROOT / "topologies")
    if done.returncode != 0:
        logs = "".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((folder / "run").glob("*.log")))
        raise SystemExit(f"{topology.name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}\n{logs}")
    return json.loads(summary.read_text())["samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = topologies(Path(tmp))
        figures: dict[str, list[float]] = {name: [] for name in paths}
        for i in range(args.rounds):
            for name, path in paths.items():
                figures[name].append(samples_per_s(path, Path(tmp) / f"{name}-{i}", args.epochs))
    medians = {name: statistics.median(values) for name, values in figures.items()}
    print(json.dumps({"samples_per_s": figures, "median": medians,
                      "dial_out_vs_inbound": medians["dial-out"] / medians["inbound"]}, indent=2))


if __name__ == "__main__":
    main()
