"""Make a three-site project in one folder, as its parties would: each site creates its own keys and data
catalogue, the provisioner signs a kit per site from the public identities, and a submitter gets keys.

    python examples/sites/setup_project.py OUT --broker tcp://lab:7100 --lab tcp://lab:7003

OUT/sites/SITE/{state,data} is each site's machine (state: keys, policy; data: CSV files and catalogue),
OUT/kits/SITE its kit, OUT/alice the submitter's keys, OUT/job.yaml the job. docs/sites.md walks through it."""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import yaml
from sklearn.datasets import load_breast_cancer

from meshsl.apps.sites.identity import create_identity, load_identity
from meshsl.apps.sites.kit import provision

HERE = Path(__file__).resolve().parent
SITES = {"lab": "lab", "hospital_a": "hospital-a", "hospital_b": "hospital-b"}
FORBIDDEN = "worst area"  # hospital B's policy keeps this column out of every job


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def site_data(out: Path) -> tuple[list[str], list[str]]:
    bunch = load_breast_cancer()
    names = [str(n) for n in bunch.feature_names]
    columns = {"hospital_a": names[:15], "hospital_b": names[15:]}
    for site, entry in (("hospital_a", "records_a"), ("hospital_b", "records_b")):
        data = out / "sites" / site / "data"
        data.mkdir(parents=True, exist_ok=True)
        lo = 0 if site == "hospital_a" else 15
        _write_csv(data / f"{entry}.csv", columns[site], (row[lo:lo + 15].tolist() for row in bunch.data))
        (data / "catalogue.yaml").write_text(yaml.safe_dump(
            {"sources": {entry: {"dataset": {"name": "csv", "options": {"path": f"{entry}.csv"}}}}}))
    data = out / "sites" / "lab" / "data"
    data.mkdir(parents=True, exist_ok=True)
    _write_csv(data / "diagnoses.csv", ["diagnosis"], ([int(y)] for y in bunch.target))
    (data / "catalogue.yaml").write_text(yaml.safe_dump(
        {"sources": {"diagnoses": {"dataset": {"name": "csv", "options": {"path": "diagnoses.csv",
                                                                             "label_column": "diagnosis"}}}}}))
    return columns["hospital_a"], columns["hospital_b"]


def policies(out: Path) -> None:
    common = {"max_runtime_s": 900, "release": ["metrics", "logs"]}
    rules = {"lab": {"parties": ["hospital-a", "hospital-b"], "sources": {"diagnoses": {}}},
             "hospital_a": {"parties": ["lab", "hospital-b"], "sources": {"records_a": {}}},
             "hospital_b": {"parties": ["lab", "hospital-a"],
                            "sources": {"records_b": {"forbid_columns": [FORBIDDEN]}}}}
    for site, rule in rules.items():
        (out / "sites" / site / "state" / "policy.yaml").write_text(yaml.safe_dump({**rule, **common}))


def make_project(out: Path, broker: str, lab: str) -> dict[str, Path]:
    out = Path(out)
    identities = {}
    for site in SITES:
        identities[site] = create_identity(out / "sites" / site / "state" / "identity", site)
        (out / "public").mkdir(parents=True, exist_ok=True)
        (out / "public" / f"{site}.identity.json").write_text(
            (out / "sites" / site / "state" / "identity" / f"{site}.identity.json").read_text())
    create_identity(out / "alice", "alice")
    (out / "public" / "alice.identity.json").write_text((out / "alice" / "alice.identity.json").read_text())
    create_identity(out / "admin", "admin")
    project = {"name": "breast-cancer-study", "broker": {"site": "lab", "endpoint": broker},
               "sites": [{"name": s, "party": p, "identity": f"public/{s}.identity.json", "inbound": s == "lab"}
                         for s, p in SITES.items()],
               "submitters": [{"name": "alice", "identity": "public/alice.identity.json"}]}
    (out / "project.yaml").write_text(yaml.safe_dump(project, sort_keys=False))
    kits = provision(out / "project.yaml", load_identity(out / "admin", "admin"), out / "kits")
    columns_a, columns_b = site_data(out)
    policies(out)
    job = (HERE / "job.yaml").read_text().replace("LAB_ENDPOINT", lab)
    job = job.replace("COLUMNS_A", yaml.safe_dump(columns_a, default_flow_style=True).strip())
    (out / "job.yaml").write_text(job.replace("COLUMNS_B", yaml.safe_dump(columns_b, default_flow_style=True).strip()))
    return kits


def without_forbidden_column(job_text: str) -> str:
    """The job, resubmitted: hospital B's features without the column its policy forbids."""
    document = yaml.safe_load(job_text)
    data = next(d for d in document["data"] if d["name"] == "features_b")
    kept = [c for c in data["dataset"]["options"]["columns"] if c != FORBIDDEN]
    data["columns"] = kept
    encoder = next(s for s in document["segments"] if s["name"] == "encoder_b")
    encoder["layers"][0][1] = len(kept)
    return yaml.safe_dump(document, sort_keys=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--broker", default="tcp://lab:7100")
    parser.add_argument("--lab", default="tcp://lab:7003")
    args = parser.parse_args()
    for site, folder in make_project(args.out, args.broker, args.lab).items():
        print(f"{site}: {folder}")
