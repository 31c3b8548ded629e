"""Regenerates the CSV files of topologies/vertical_psi.yaml from scikit-learn's breast-cancer data.

Vertical data as it really arrives: each party holds its own patients (string ids), in its own row
order, with about 70-75 % of its rows shared by all three parties and extra rows of its own.
  300 patients: at both hospitals and the lab (the only ones training can use)
   40 patients: at both hospitals, no diagnosis at the lab
   70 + 70:     at hospital A only / hospital B only
   89:          diagnosis at the lab only
Each hospital z-scores its own columns over its own rows. Deterministic: `python topologies/data/vertical_psi/make.py` rewrites the same files.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer

HERE = Path(__file__).resolve().parent


def main() -> None:
    data = load_breast_cancer()
    n = len(data.target)
    rng = np.random.default_rng(16)
    ids = [f"pt-{v:08x}" for v in rng.choice(2**32, size=n, replace=False)]
    who = rng.permutation(n)
    core, both, only_a, only_b, only_lab = np.split(who, np.cumsum([300, 40, 70, 70]))
    holders = {"hospital_a": np.concatenate([core, both, only_a]),
               "hospital_b": np.concatenate([core, both, only_b]),
               "lab": np.concatenate([core, only_lab])}
    names = [str(c) for c in data.feature_names]
    for party, rows in holders.items():
        rows = rng.permutation(rows)  # each party's own row order
        with (HERE / f"{party}.csv").open("w", newline="") as handle:
            out = csv.writer(handle)
            if party == "lab":
                out.writerow(["patient_id", "diagnosis"])
                out.writerows([ids[r], int(data.target[r])] for r in rows)
                continue
            columns = list(range(0, 15) if party == "hospital_a" else range(15, 30))
            x = data.data[np.ix_(rows, columns)]
            x = (x - x.mean(axis=0)) / x.std(axis=0)  # each hospital z-scores its own columns on its own rows
            out.writerow(["patient_id"] + [names[c] for c in columns])
            out.writerows([ids[r]] + [f"{v:.6g}" for v in x[i]] for i, r in enumerate(rows))


if __name__ == "__main__":
    main()
