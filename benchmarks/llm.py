"""Split LoRA fine-tuning of a causal LM (issue 28): tokens/s and peak memory per node of the U-shaped
topology (topologies/llm_u_shaped.yaml: the 6-block, 256-wide Llama) at M = 1/4/8 micro-batches, against
the same model and adapters trained unsplit in one process with plain peft on the same cores (2 threads:
what the two single-threaded nodes use together); activations and gradients in bf16/fp16 on the wire
(bytes per token, loss against fp32 after the same steps); and one row over the emulated 50 ms WAN
(benchmarks/wan.py; needs root, skipped otherwise).

    python -m benchmarks --only llm [--quick]       (quick: a 3-block, 64-wide model, a few steps, no WAN)
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import yaml

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGY = ROOT / "topologies" / "llm_u_shaped.yaml"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def document(quick: bool, work: Path, micro_batches: int, steps: int, codec: str = "none",
             addresses: Optional[list[str]] = None) -> dict:
    """The example topology (quick: over a tiny model built in `work`), endpoints on loopback or the sites."""
    from meshsl.launch.launcher import free_port
    doc = yaml.safe_load(TOPOLOGY.read_text())
    model = ROOT / "models" / "tiny-llama"
    if quick:
        model = work / "tiny"
        doc["segments"][0]["llm"]["create"].update(layers=3, width=64, heads=2, vocab=400, context=64)
        doc["segments"][0]["llm"]["blocks"] = [0, 2]
        doc["segments"][1]["llm"]["blocks"] = [2, 3]
        doc["segments"][2]["llm"]["blocks"] = [3, 3]
    for seg in doc["segments"]:
        seg["llm"]["model"] = str(model)
        seg["llm"].get("create", {})["corpus"] = str(ROOT / "topologies" / "data" / "llm_corpus.jsonl")
    for data in doc["data"]:
        data["dataset"]["options"].update(tokenizer=str(model), path=str(ROOT / "topologies" / "data" / "llm_corpus.jsonl"))
    ports = [free_port(), free_port()]
    for i, node in enumerate(doc["nodes"]):
        node["endpoint"] = f"tcp://{addresses[i] if addresses else '127.0.0.1'}:{ports[i] if not addresses else 7500 + i}"
    doc["training"].update(micro_batches=micro_batches, steps=steps, eval_at_start=False)
    doc.pop("checkpoint", None)
    if codec != "none":
        doc["privacy"] = [{"segment": s, "forward": {"codec": codec}, "backward": {"codec": codec}}
                          for s in ("bottom", "middle")]
    doc["retry"] = {"timeout_s": 120, "heartbeat_timeout_s": 60, "startup_timeout_s": 120}
    return doc


def run_split(doc: dict, work: Path, tag: str, warmup: int, exec_prefix=None) -> dict:
    """Both nodes as processes (in the sites' namespaces where given): steady tokens/s, peak RSS, the summary."""
    from benchmarks.common import PeakRss, kill_left
    from benchmarks.wan import step_times
    from meshsl.launch.entry import PROGRESS_PREFIX
    path = work / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    names = [n["name"] for n in doc["nodes"]]
    procs, stamps, rss = {}, [], PeakRss(interval=0.1).start()
    try:
        for i, name in enumerate(names):
            cmd = [sys.executable, "-m", "meshsl", "--log-level", "warning", "node", name, "--topology", str(path),
                   "--base-dir", str(ROOT), "--no-eval", "--summary-json", str(work / f"{tag}-{name}.json"),
                   *(["--progress-stream"] if i == 0 else [])]
            cmd = exec_prefix(i, cmd) if exec_prefix else cmd
            log = open(work / f"{tag}-{name}.log", "w")
            procs[name] = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE if i == 0 else log, stderr=log, text=True)
            rss.pids[name] = procs[name].pid
        for line in procs[names[0]].stdout:
            if line.startswith(PROGRESS_PREFIX) and "step" in (row := json.loads(line[len(PROGRESS_PREFIX):])) \
                    and not row.get("event"):
                stamps.append(time.perf_counter())
        for name, proc in procs.items():
            if proc.wait(timeout=600) != 0:
                raise RuntimeError(f"{tag}: {name} exited {proc.returncode}: {(work / f'{tag}-{name}.log').read_text()[-1500:]}")
    finally:
        peaks = rss.stop()
        kill_left(procs)
    summary = json.loads((work / f"{tag}-{names[0]}.json").read_text())
    times = step_times(stamps[warmup:])
    tokens = doc["training"]["batch_size"] * seq_len(doc)
    return {"tokens_per_s": round(tokens * 1000 / times["median_ms_per_step"], 1), "ms_per_step": times,
            "peak_rss_mib": peaks, "train_loss": summary["tasks"]["lm"]["train"]["loss"],
            "wire_bytes_per_token": round(sum(summary["bytes_per_sample"].values()) / seq_len(doc), 1)}


def seq_len(doc: dict) -> int:
    return doc["data"][0]["dataset"]["options"]["seq_len"]


# ---- the same model and adapters unsplit, one process, plain peft ------------------------------
def unsplit_main(args: list[str]) -> None:
    """`python -m benchmarks.llm unsplit MODEL CORPUS BATCH SEQ STEPS WARMUP THREADS`: prints tokens/s."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from meshsl.data.text import load_text
    model_dir, corpus, batch, length, steps, warmup, threads = args[0], args[1], *map(int, args[2:])
    torch.set_num_threads(threads)
    tokens = torch.as_tensor(load_text(Path("/"), corpus, model_dir, length).labels)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.003, weight_decay=0.0)
    rng, stamps = np.random.default_rng(0), []
    for _ in range(steps):
        ids = tokens[torch.as_tensor(rng.choice(len(tokens), batch, replace=False))]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
    with open("/proc/self/status") as handle:
        hwm = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM"))
    print(json.dumps({"tokens_per_s": round(batch * length / statistics.median(gaps), 1),
                      "peak_rss_mib": round(hwm / 1024, 1)}))


def run_unsplit(doc: dict, steps: int, warmup: int, threads: int) -> dict:
    llm, options = doc["segments"][0]["llm"], doc["data"][0]["dataset"]["options"]
    out = subprocess.run([sys.executable, "-m", "benchmarks.llm", "unsplit", llm["model"], options["path"],
                          str(doc["training"]["batch_size"]), str(options["seq_len"]), str(steps), str(warmup),
                          str(threads)], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare(doc: dict, work: Path) -> None:
    path = work / "prepare.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    subprocess.run([sys.executable, "-m", "meshsl", "llm", "prepare", str(path)], cwd=ROOT, check=True,
                   capture_output=True)


def measure(quick: bool = False, micro_batches=(1, 4, 8), codecs=("bf16", "fp16"), smoke: bool = False) -> dict:
    """Each split case right after its own unsplit baseline run (the machine's load drifts; a ratio of
    neighbouring runs is what it can be trusted for), and the M=4 pair twice more: its ratio is the median.
    `smoke`: the quick model for 4 steps, M=4 with bf16 on the wire only (fp32 is not run: no loss gap)."""
    if smoke:
        quick, micro_batches, codecs = True, (4,), ("bf16",)
    steps, warmup = (4, 1) if smoke else (8, 3) if quick else (40, 8)
    rows, load_start = [], os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="meshsl-llm-") as tmp:
        work = Path(tmp)
        prepare(document(quick, work, 4, steps), work)
        base = document(quick, work, 1, steps)
        cases = [] if smoke else [(f"split U-shape, 2 nodes x 1 thread, M={m}", m, "none") for m in micro_batches]
        cases += [(f"split M=4, {c} on the wire", 4, c) for c in codecs if 4 in micro_batches]
        if not quick and 4 in micro_batches:
            cases += [(f"split U-shape, 2 nodes x 1 thread, M=4 (repeat {i})", 4, "none") for i in (2, 3)]
        fp32_loss = None
        for i, (case, m, codec) in enumerate(cases):
            unsplit = run_unsplit(base, steps, warmup, threads=2)
            r = run_split(document(quick, work, m, steps, codec), work, f"case{i}", warmup)
            fp32_loss = r["train_loss"] if m == 4 and codec == "none" and fp32_loss is None else fp32_loss
            rows.append({"case": case, **r, "unsplit_tokens_per_s": unsplit["tokens_per_s"],
                         "unsplit_peak_rss_mib": unsplit["peak_rss_mib"],
                         "ratio_vs_unsplit": round(r["tokens_per_s"] / unsplit["tokens_per_s"], 3),
                         **({"loss_minus_fp32": round(r["train_loss"] - fp32_loss, 5)}
                            if codec != "none" and fp32_loss is not None else {})})
        if not quick:
            rows.append(wan_row(work, steps, warmup, run_unsplit(base, steps, warmup, threads=2)))
    m4 = [r["ratio_vs_unsplit"] for r in rows if r["case"].startswith("split U-shape, 2 nodes x 1 thread, M=4")]
    return {"model": "tiny (3 blocks, width 64)" if quick else "llm_u_shaped.yaml (6 blocks, width 256, vocab 2000)",
            "batch_size": base["training"]["batch_size"], "seq_len": seq_len(base), "steps": steps,
            "warmup_steps": warmup, "statistic": "median step after warm-up; ratios to the unsplit run just before",
            "m4_ratio_median": statistics.median(m4) if m4 else None, "load_avg_1m_at_start": load_start,
            "load_avg_1m_at_end": os.getloadavg()[0], "rows": rows}


def wan_row(work: Path, steps: int, warmup: int, unsplit: dict) -> dict:
    """M=4 with each node on its own emulated site, 50 ms RTT, 100 Mbit/s (benchmarks/wan.py)."""
    from benchmarks.wan import Sites, unavailable
    why = unavailable()
    if why:
        return {"case": "split M=4 over 50 ms WAN", "skipped": why}
    with Sites(2) as sites:
        sites.set_link(50.0, 100.0)
        doc = document(False, work, 4, steps, addresses=sites.addresses)
        r = run_split(doc, work, "wan", warmup, exec_prefix=lambda i, cmd: sites.exec(sites.names[i], *cmd))
    return {"case": "split M=4 over 50 ms RTT, 100 Mbit/s", **r, "unsplit_tokens_per_s": unsplit["tokens_per_s"],
            "unsplit_peak_rss_mib": unsplit["peak_rss_mib"],
            "ratio_vs_unsplit": round(r["tokens_per_s"] / unsplit["tokens_per_s"], 3)}


def table(result: dict) -> str:
    lines = [f"LLM split fine-tuning: {result['model']}, batch {result['batch_size']} x {result['seq_len']} tokens, "
             f"load {result['load_avg_1m_at_start']:.2f} -> {result['load_avg_1m_at_end']:.2f}"
             + (f"; M=4 median x unsplit {result['m4_ratio_median']:.2f}" if result.get("m4_ratio_median") else ""),
             "case | tokens/s | unsplit tokens/s (run just before) | x unsplit | peak RSS MiB per node (unsplit) | "
             "wire bytes/token | loss - fp32"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"{r['case']} | skipped: {r['skipped']}")
            continue
        lines.append(" | ".join(str(c) for c in (
            r["case"], f"{r['tokens_per_s']:,.0f}", f"{r['unsplit_tokens_per_s']:,.0f}", r["ratio_vs_unsplit"],
            " ".join(f"{v:.0f}" for v in r["peak_rss_mib"].values()) + f" ({r['unsplit_peak_rss_mib']:.0f})",
            r.get("wire_bytes_per_token", ""), r.get("loss_minus_fp32", ""))))
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["unsplit"]:
        unsplit_main(sys.argv[2:])
    else:
        result = measure(quick="--quick" in sys.argv, smoke="--smoke" in sys.argv)
        print(table(result))
        print(json.dumps(result, indent=1))
