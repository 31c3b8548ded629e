"""Write the three parties' CSV files of topologies/vertical_wine.yaml from scikit-learn's wine data.

Raw units (proline ~ 1,000, hue ~ 1), a few empty cells at party B, and each party's own column names:
what a user's export from three systems looks like. `python topologies/data/wine/make.py` rewrites them.
"""
from pathlib import Path

import numpy as np
from sklearn.datasets import load_wine

HERE = Path(__file__).resolve().parent
PARTIES = {"vineyard": slice(0, 5), "cellar": slice(5, 9), "lab": slice(9, 13)}


def main() -> None:
    wine = load_wine()
    x, y, names = wine.data, wine.target, [n.replace("/", "_") for n in wine.feature_names]
    rng = np.random.default_rng(3)
    for party, columns in PARTIES.items():
        block = x[:, columns]
        header = ["sample_id"] + names[columns] + (["cultivar"] if party == "lab" else [])
        lines = [",".join(header)]
        for i, row in enumerate(block):
            cells = [f"{v:g}" for v in row]
            if party == "cellar" and rng.random() < 0.05:
                cells[int(rng.integers(len(cells)))] = ""  # a missing measurement
            lines.append(",".join([f"w{i:03d}", *cells, *([f"class_{y[i]}"] if party == "lab" else [])]))
        (HERE / f"{party}.csv").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
