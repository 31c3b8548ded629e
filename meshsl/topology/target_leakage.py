"""Target leakage: a column that is one data source's label (or sample id) fed to a model as a feature.

Two sources read from the same file: the label source's `label_column` (or an `id_column`) must not be
among the other's selected feature columns (an error naming both). Sources from different files whose
feature column carries a label column's name get a warning: it may be a coincidence of names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from meshsl.errors import DataError


def source_file(spec, base_dir) -> Optional[Path]:
    path = spec.dataset.options.get("path")
    if not isinstance(path, str):
        return None
    full = Path(path).expanduser()
    return (full if full.is_absolute() else Path(base_dir) / full).resolve()


def _protected_columns(topology) -> list[tuple[str, str, str, Optional[Path]]]:
    """(source, role, column, file) of every label column and id column in the topology."""
    out = []
    for name, spec in topology.data.items():
        file = source_file(spec, topology.base_dir)
        label = spec.dataset.options.get("label_column")
        if spec.kind == "labels" and isinstance(label, str):
            out.append((name, "label", label, file))
        if spec.id_column is not None:
            out.append((name, "id", spec.id_column, file))
    return out


def target_leakage_problems(topology, feature_names: dict[str, tuple[str, ...]], where_of) -> list[DataError]:
    """`feature_names`: each feature source's selected columns; `where_of(source)`: its key path."""
    problems: list[DataError] = []
    protected = _protected_columns(topology)
    for name, columns in feature_names.items():
        file = source_file(topology.data[name], topology.base_dir)
        for owner, role, column, owner_file in protected:
            if owner == name or column not in columns:
                continue
            what = "the label" if role == "label" else "the sample id"
            if file is not None and file == owner_file:
                problems.append(DataError(
                    f"column {column!r} of {file.name} is {what} of data source {owner!r} and a feature of "
                    f"{name!r}: a model fed its own target (or ids) learns nothing real; declare "
                    f"`label_column: {column}` in the options of {name!r}, or leave the column out of its `columns`",
                    f"{where_of(name)}.columns"))
            elif role == "label":
                topology.warnings.append(
                    f"{where_of(name)}: feature column {column!r} has the name of {owner!r}'s label column; "
                    f"if it is the same quantity, the model sees its own target (target leakage)")
    return problems
