"""What a data source wants from its file: which feature columns, how many rows, whether NaN may stay.

File readers that can project (csv, parquet, arrow, numpy) take a `Selection` and convert only what it
names, so a label holder reads one column of a 1,500-column table and a validation probe reads a few
rows. Column choices resolve against the file's own feature names before anything is read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from meshsl.errors import DataError


@dataclass(frozen=True)
class Selection:
    columns: Any = "all"  # the data source's `columns:`: "all", "a:b", names and/or indices
    features: bool = True  # False: only labels and ids are wanted (a label source, a row count)
    head: Optional[int] = None  # only the first rows (shape probes)
    allow_missing: bool = False  # NaN (an empty cell, a null) stays, to be imputed; infinities are still errors

    def key(self) -> str:
        columns = self.columns if isinstance(self.columns, str) else tuple(self.columns)
        return repr((columns, self.features, self.head, self.allow_missing))


def resolve_columns(names: Sequence[str], columns: Any, where: str = "columns") -> list[int]:
    """Positions in `names` that a `columns:` value selects, in the order given."""
    width = len(names)
    if isinstance(columns, str) and columns == "all":
        return list(range(width))
    if isinstance(columns, str):
        if ":" in columns:
            return slice_positions(columns, width, where)
        columns = [columns]
    if not isinstance(columns, (list, tuple)) or not columns:
        raise DataError(f"expected 'all', an 'a:b' slice or a non-empty list of columns, got {columns!r}", where)
    positions = {name: i for i, name in enumerate(names)}
    chosen: list[int] = []
    for item in columns:
        if isinstance(item, int) and not isinstance(item, bool):
            if not 0 <= item < width:
                raise DataError(f"column {item} is out of range; features have {width} columns", where)
            chosen.append(int(item))
        elif isinstance(item, str) and item in positions:
            chosen.append(positions[item])
        else:
            known = ", ".join(list(names)[:8]) + (", ..." if width > 8 else "")
            raise DataError(f"unknown column {item!r}; columns are 0..{width - 1} or names like {known}", where)
    if len(set(chosen)) != len(chosen):
        raise DataError(f"columns {columns!r} select a column twice", where)
    return chosen


def slice_positions(text: str, width: int, where: str) -> list[int]:
    parts = text.split(":")
    try:
        bounds = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        bounds = []
    if not 2 <= len(parts) <= 3 or not bounds or (len(bounds) == 3 and bounds[2] == 0):
        raise DataError(f"{text!r} is not a slice like '0:10', '5:' or '::2'", where)
    chosen = list(range(width))[slice(*bounds)]
    if not chosen:
        raise DataError(f"slice {text!r} selects no columns of {width}", where)
    return chosen
