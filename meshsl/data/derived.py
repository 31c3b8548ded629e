"""Derived datasets for examples: the same samples (rows) as a built-in dataset with other labels,
so several tasks can be declared over one set of aligned samples."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from meshsl.data.registry import load_dataset
from meshsl.errors import DataError
from meshsl.data.specs import DatasetSpec


def _labels(table: Any) -> np.ndarray:
    if table.labels is None:  # digits always has labels; a table without them cannot be relabelled
        raise DataError("the digits table has no labels")
    return np.asarray(table.labels)


def digits_parity() -> tuple:
    """scikit-learn digits with label 1 for odd digits, 0 for even ones."""
    table = load_dataset(DatasetSpec(name="digits"), Path("."))
    return table.features, _labels(table) % 2


def digits_large() -> tuple:
    """scikit-learn digits with label 1 for digits 5..9."""
    table = load_dataset(DatasetSpec(name="digits"), Path("."))
    return table.features, (_labels(table) >= 5).astype("int64")
