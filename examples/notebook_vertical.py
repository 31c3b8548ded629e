"""meshsl from Python, cell by cell as in a notebook: three parties (two hospitals and a lab) train on
vertically split breast-cancer data, each party as its own local process over ZeroMQ.

Run it as a script (`python examples/notebook_vertical.py [WORK_DIR]`) or paste the cells into Jupyter.
tests/e2e/test_api.py executes it and checks that its weights equal `meshsl run`'s."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import meshsl

ROOT = Path(__file__).resolve().parents[1]


def main(work: Path, steps: int = 8) -> meshsl.RunResult:
    # %% Load and check: overrides are validated like the YAML (a typo gets a "did you mean").
    topology = meshsl.load(ROOT / "topologies" / "vertical.yaml", overrides={"training.optimizer.lr": 0.01})
    for warning in meshsl.validate(topology):
        print("warning:", warning)
    plan = meshsl.plan(topology)
    print(f"{plan['topology']}: coordinator {plan['coordinator']}, nodes {', '.join(plan['nodes'])}")
    for warning in plan["leakage_warnings"]:
        print("leakage:", warning)

    # %% Stop a run from the progress callback (the stop button, KeyboardInterrupt, works the same way):
    # every node process is stopped and RunCancelled says how far it got.
    try:
        meshsl.run(topology, steps=steps, run_dir=work / "cancelled", free_ports=True,
                   on_progress=lambda row: row.get("step", 0) < 1)  # False after step 2: stop
    except meshsl.RunCancelled as stopped:
        print(f"cancelled: {stopped} (logs and checkpoints in {stopped.run_dir})")

    # %% Train: one process per party; progress rows arrive as the steps commit.
    def show(row: dict) -> None:
        if "tasks" in row:
            print(f"step {row['step']}: " + ", ".join(f"{t} loss {v['loss']:.3f}" for t, v in row["tasks"].items()))

    result = meshsl.run(topology, steps=steps, run_dir=work / "run", free_ports=True, on_progress=show)
    print("held-out:", {task: round(m["accuracy"], 3) for task, m in result.metrics.items()})
    print("weights:", ", ".join(sorted(result.weight_files)))

    # %% Use the model: each party exports its own segments; together they assemble one torch module.
    exports = []
    for node in topology.nodes:
        meshsl.export(topology, result.weights_dir, node, work / "export" / node)
        exports.append(work / "export" / node)
    model = meshsl.load_model(meshsl.assemble(topology, exports, work / "model.pt"))
    print("assembled:", type(model).__name__, sorted(model.segments))
    return result


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="meshsl-notebook-")))
