"""A data source as its node sees it: the selected feature columns (or the labels) of its dataset.

`load_source` is the one way the rest of meshsl reads a `data:` entry. Loaders that project
(csv, parquet, arrow, numpy) read only what the entry selects; the others load their whole table,
from which the columns are taken here.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from meshsl.data.registry import DATASETS, Table, column_indices, load_dataset, projects
from meshsl.data.selection import Selection


def selection_of(spec, head: Optional[int] = None) -> Selection:
    """What a DataSpec asks of its file; a label source wants no feature column."""
    preprocess = getattr(spec, "preprocess", None)
    missing_ok = preprocess is not None and preprocess.impute != "none"
    return Selection(columns=spec.columns, features=spec.kind == "features", head=head, allow_missing=missing_ok)


def load_source(spec, base_dir: Path | str, head: Optional[int] = None) -> Table:
    """The Table of data source `spec` (a DataSpec): `features` holds exactly its selected columns
    (float32, possibly memory-mapped; none for a label source), with its labels and ids."""
    selection = selection_of(spec, head)
    loader = DATASETS.get(spec.dataset.name)
    if loader is not None and projects(loader):
        return load_dataset(spec.source_dataset, base_dir, selection)
    table = load_dataset(spec.source_dataset, base_dir)
    if spec.kind == "features":
        chosen = column_indices(table, spec.columns)
        if chosen is not None:
            table = replace(table, features=table.features[:, chosen],
                            feature_names=tuple(table.feature_names[i] for i in chosen))
    if head is not None:
        table = replace(table, features=table.features[:head],
                        labels=None if table.labels is None else table.labels[:head],
                        ids=None if table.ids is None else table.ids[:head])
    return table
