"""Data by catalogue name: `dataset: {name: catalogue, options: {entry: NAME, ...}}`.

A site keeps its own catalogue (a YAML file; `MESHSL_CATALOGUE` or `meshsl node --catalogue` names it) that
maps names to local datasets, so a topology shared between parties never holds a path on someone else's
machine. Every party loads the same topology; only the party whose catalogue holds the entry reads data.
The others see the entry's published schema (`columns`, `rows`, `classes`: names and counts, never values)
as a table of zeros that occupies no memory, which is all shape inference needs."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import yaml

from meshsl.data.registry import Table, load_dataset, register_dataset, register_row_count
from meshsl.data.specs import DatasetSpec
from meshsl.errors import DataError

CATALOGUE_ENV = "MESHSL_CATALOGUE"


def catalogue_path() -> Optional[Path]:
    value = os.environ.get(CATALOGUE_ENV)
    return Path(value) if value else None


def read_catalogue(path: Path) -> dict[str, DatasetSpec]:
    """Entry name -> its dataset (relative paths resolve against the catalogue's folder, see base_of)."""
    try:
        document = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"cannot read the catalogue: {exc}", str(path)) from None
    sources = document.get("sources") if isinstance(document, dict) else None
    if not isinstance(sources, dict):
        raise DataError("a catalogue is a mapping with a `sources:` mapping of name -> {dataset: ...}", str(path))
    entries = {}
    for name, entry in sources.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("dataset"), dict):
            raise DataError("each source needs a `dataset:` mapping (name, options)", f"{path}: sources.{name}")
        if entry["dataset"].get("name") == "catalogue":
            raise DataError("a catalogue entry cannot point at another catalogue entry", f"{path}: sources.{name}")
        try:
            entries[str(name)] = DatasetSpec.model_validate(entry["dataset"])
        except ValueError as exc:
            raise DataError(f"invalid dataset: {exc}", f"{path}: sources.{name}.dataset") from None
    return entries


def _local_entry(entry: str) -> tuple[Optional[DatasetSpec], Optional[Path]]:
    path = catalogue_path()
    if path is None:
        return None, None
    return read_catalogue(path).get(entry), path.parent


def _schema_table(entry: str, columns: Optional[Sequence[str]], rows: Optional[int], classes: Optional[int]) -> Table:
    if rows is None or (columns is None and classes is None):
        where = f"catalogue entry {entry!r}"
        raise DataError(f"{where} is not in this site's catalogue ({CATALOGUE_ENV}="
                        f"{os.environ.get(CATALOGUE_ENV, 'unset')}) and the topology publishes no schema for it "
                        f"(options rows, and columns for features or classes for labels)", where)
    width = len(columns or ())
    features = np.broadcast_to(np.zeros((), np.float32), (int(rows), width))  # a view: no memory per row
    labels = np.zeros(int(rows), np.int64) if classes else None
    return Table(features=features, labels=labels, num_classes=classes, feature_names=tuple(columns or ()))


@register_dataset("catalogue")
def _load_catalogue(base_dir: Path, *, entry: str, columns: Optional[Sequence[str]] = None,
                    rows: Optional[int] = None, classes: Optional[int] = None) -> Table:
    spec, base = _local_entry(entry)
    if spec is None or base is None:
        return _schema_table(entry, columns, rows, classes)
    table = load_dataset(spec, base)
    where = f"catalogue entry {entry!r}"
    if columns is not None and tuple(columns) != tuple(table.feature_names):
        raise DataError(f"the topology publishes columns {list(columns)[:6]}... but this site's data has "
                        f"{list(table.feature_names)[:6]}... ({len(table.feature_names)} columns)", where)
    if rows is not None and rows != len(table.features):
        raise DataError(f"the topology publishes {rows} rows but this site's data has {len(table.features)}", where)
    return table


def _rows(base_dir: Path, *, entry: str, columns: Optional[Sequence[str]] = None, rows: Optional[int] = None,
          classes: Optional[int] = None) -> int:
    spec, base = _local_entry(entry)
    if spec is None or base is None:
        return _schema_table(entry, columns, rows, classes).features.shape[0]
    return len(load_dataset(spec, base).features)


register_row_count("catalogue", _rows)
