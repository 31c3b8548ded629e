"""Derived datasets for examples: the same samples (rows) as a built-in dataset with other labels,
so several tasks can be declared over one set of aligned samples."""
from __future__ import annotations

from pathlib import Path

from meshsl.data.registry import load_dataset
from meshsl.data.specs import DatasetSpec


def digits_parity() -> tuple:
    """scikit-learn digits with label 1 for odd digits, 0 for even ones."""
    table = load_dataset(DatasetSpec(name="digits"), Path("."))
    return table.features, table.labels % 2


def digits_large() -> tuple:
    """scikit-learn digits with label 1 for digits 5..9."""
    table = load_dataset(DatasetSpec(name="digits"), Path("."))
    return table.features, (table.labels >= 5).astype("int64")
