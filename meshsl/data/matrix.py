"""Float32 feature matrices read a block of rows at a time (bounded memory, values checked on the way)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from meshsl.data.selection import Selection
from meshsl.errors import DataError

BLOCK_ROWS = 65_536  # rows converted at a time: ~390 MB of data for 1,500 float32 columns


def mapped_selection(matrix: np.ndarray, positions: list[int], selection: Selection, file: Path
                     ) -> tuple[np.ndarray]:
    """A memory-mapped [rows, width] float32 matrix as the selection wants it: all columns stay mapped
    (rows are read when a micro-batch needs them); a column subset is copied into memory, block by block."""
    rows = len(matrix) if selection.head is None else min(len(matrix), selection.head)
    view = matrix[:rows]
    whole = positions == list(range(matrix.shape[1]))
    out = view if whole else np.empty((rows, len(positions)), dtype=np.float32)
    for start in range(0, rows, BLOCK_ROWS):
        block = view[start:start + BLOCK_ROWS]
        if not whole:
            block = out[start:start + BLOCK_ROWS] = block[:, positions]
        bad = ~np.isfinite(block) if not selection.allow_missing else np.isinf(block)
        if bad.any():
            r, j = (int(v[0]) for v in np.nonzero(bad))
            raise DataError(f"{file}: row {start + r + 1}, column {positions[j]}: {block[r, j]}", "data")
    return (out,)
