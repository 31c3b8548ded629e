"""Tables from files, read with Apache Arrow: CSV, Parquet, Arrow IPC / Feather and .npy.

Every reader converts only the columns a data source selects, straight to float32, a block of rows at
a time into one preallocated [rows, columns] matrix: a party's peak memory is its float32 feature
matrix plus one block, never a float64 copy or a whole Arrow table beside the matrix. Sample ids are
read as exact strings. Arrow IPC files whose features are one fixed-size-list column, and C-ordered
float32 .npy files, stay memory-mapped: only the rows a micro-batch needs are ever read.

Errors name the file, the line (CSV) or row, and the column.
"""
from __future__ import annotations

import csv
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.ipc as pa_ipc
import pyarrow.parquet as pq

from meshsl.data.matrix import BLOCK_ROWS, mapped_selection

COLUMN_CHUNK = 64  # Parquet columns decoded at a time: Arrow's buffers scale with it, not with the width
from meshsl.data.selection import Selection, resolve_columns
from meshsl.errors import DataError



@dataclass(frozen=True)
class Columns:
    """The file's columns by role, and the feature columns the selection keeps."""

    names: tuple[str, ...]  # every column, file order
    features: tuple[str, ...]  # selected feature columns, selection order
    label: Optional[str]
    ids: Optional[str]


def plan_columns(names: list[str], file: Path, selection: Selection, label_column: Optional[str],
                 id_column: Optional[str], where: str) -> Columns:
    for role, column in (("label_column", label_column), ("id_column", id_column)):
        if column is not None and column not in names:
            shown = names[:12] + (["..."] if len(names) > 12 else [])
            if role == "label_column":
                raise DataError(f"label_column {column!r} is not in the header {shown} of {file}",
                                f"{where}.options.label_column")
            raise DataError(f"{file}: id column {column!r} is not in the header {shown}", f"{where}.id_column")
    candidates = [n for n in names if n not in (label_column, id_column)]
    chosen = resolve_columns(candidates, selection.columns) if selection.features else []
    return Columns(tuple(names), tuple(candidates[i] for i in chosen), label_column, id_column)


# ---------------------------------------------------------------- the float32 matrix, block by block

class MatrixFill:
    """Writes record batches into a preallocated float32 matrix, checking every value on the way."""

    def __init__(self, rows: int, columns: Columns, file: Path, selection: Selection, line_offset: int) -> None:
        self.out = np.empty((rows, len(columns.features)), dtype=np.float32)
        self.columns, self.file, self.selection = columns, file, selection
        self.line_offset = line_offset  # CSV: data row r is on line r + 2; other formats: row r + 1
        self.labels: list[pa.Array] = []
        self.ids: list[pa.Array] = []
        self.rows = 0

    def add(self, batch: pa.RecordBatch) -> bool:
        """Take the next rows, every column; False once `selection.head` rows are in."""
        self.put(batch, self.rows, self.columns.features, 0, extras=True)
        return self.selection.head is None or self.rows < self.selection.head

    def put(self, batch: pa.RecordBatch, row: int, names: tuple[str, ...], first_column: int, extras: bool) -> int:
        """Rows [row, row + n) of the feature columns `names` (from position `first_column`); the label and
        id columns too when `extras`. Returns n (fewer than the batch once `selection.head` is reached)."""
        take = batch.num_rows if self.selection.head is None else max(0, min(batch.num_rows, self.selection.head - row))
        if row + take > len(self.out):
            raise DataError(f"{self.file} holds more rows than its size announced", "reading")
        if names and take:
            block = np.empty((len(names), take), dtype=np.float32)
            for j, name in enumerate(names):
                block[j] = _float_column(batch.column(name).slice(0, take), self.file, name)
            self._check(block, row, first_column)
            transpose_into(self.out[row:row + take, first_column:first_column + len(names)], block)
        if extras and take:
            if self.columns.label is not None:
                self.labels.append(batch.column(self.columns.label).slice(0, take))
            if self.columns.ids is not None:
                self.ids.append(batch.column(self.columns.ids).slice(0, take))
        self.rows = max(self.rows, row + take)
        return take

    def _check(self, block: np.ndarray, row: int, first_column: int) -> None:
        finite = np.isfinite(block)
        if finite.all():
            return
        bad = ~finite if not self.selection.allow_missing else np.isinf(block)
        if not bad.any():
            return
        j, r = (int(v[0]) for v in np.nonzero(bad))
        value = block[j, r]
        what = "an empty or missing value" if np.isnan(value) else f"{value}"
        hint = "" if np.isinf(value) else " (declare `preprocess: {impute: mean}` on the data source to fill it)"
        raise DataError(f"{self.file}: {self._place(row + r)} column {self.columns.features[first_column + j]!r}: "
                        f"{what}{hint}", "data")

    def _place(self, row: int) -> str:
        return f"line {row + self.line_offset}," if self.line_offset == 2 else f"row {row + 1},"

    def result(self) -> "FileRead":
        features = self.out[:self.rows] if self.rows < len(self.out) else self.out
        labels = _label_values(pa.chunked_array(self.labels), self.file) if self.columns.label else None
        ids = None
        if self.columns.ids is not None:
            ids = [("" if v is None else str(v)).strip() for v in pa.chunked_array(self.ids).to_pylist()]
        return FileRead(features, labels, ids, self.columns.features)


def transpose_into(target: np.ndarray, block: np.ndarray) -> None:
    """target[:] = block.T. torch's blocked transpose copy is ~4x numpy's strided one, and the transpose
    is most of what reading costs beyond Arrow's own decoding (torch is in every node process anyway)."""
    import torch
    torch.from_numpy(target).copy_(torch.from_numpy(block).t())


@dataclass(frozen=True)
class FileRead:
    features: np.ndarray  # float32 [rows, selected columns]; possibly a read-only memory map
    labels: Optional[np.ndarray]
    ids: Optional[list[str]]
    feature_names: tuple[str, ...]


def _float_column(column: pa.Array, file: Path, name: str) -> np.ndarray:
    kind = column.type
    if not (pa.types.is_floating(kind) or pa.types.is_integer(kind) or pa.types.is_boolean(kind)
            or pa.types.is_null(kind)):
        raise DataError(f"{file}: column {name!r} holds {kind}, not numbers (select numeric columns, or make it "
                        f"the label column)", "data")
    if column.type != pa.float32():
        column = column.cast(pa.float32(), safe=False)
    return column.to_numpy(zero_copy_only=False)  # nulls become NaN


def _label_values(column: pa.ChunkedArray, file: Path) -> np.ndarray:
    """Numeric label columns keep their values; text labels become class ids in sorted order."""
    if column.null_count:
        raise DataError(f"{file}: the label column has {column.null_count} empty values", "data")
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type):
        return column.cast(pa.float64()).to_numpy()
    text = [str(v).strip() for v in column.to_pylist()]
    try:
        return np.array([float(v) for v in text])
    except ValueError:
        classes = {c: i for i, c in enumerate(sorted(set(text)))}
        return np.array([classes[v] for v in text], dtype=np.int64)


# ---------------------------------------------------------------- CSV

def csv_header(file: Path, delimiter: str, where: str) -> list[str]:
    try:
        with file.open(newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's "CSV UTF-8" byte-order mark
            first = next(csv.reader(handle, delimiter=delimiter), None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {file}: {exc}", where) from None
    if not first:
        raise DataError(f"{file} needs a header row and at least one data row", where)
    header = [h.strip() for h in first]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataError(f"{file}: the header names {dupes} more than once", where)
    return header


def csv_rows(file: Path) -> int:
    """Data rows of a CSV file without parsing it: its lines, less blank lines and the header."""
    lines, blank, last = _scan_lines(file)
    return max(lines + (last not in (b"", b"\n")) - blank - 1, 0)


def _scan_lines(file: Path) -> tuple[int, int, bytes]:
    """(line breaks, blank lines, last byte), read in plain 16 MiB chunks (a memory map's pages would
    count as this process's memory). A blank line is a break right after a break (or after "\r" after one)."""
    lines = blank = 0
    before = -1  # position of the last line break before this chunk (relative to its start; -1: a blank first line)
    last = b""
    with file.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            text = np.frombuffer(chunk, dtype=np.uint8)
            breaks = np.flatnonzero(text == 10)
            lines += len(breaks)
            if len(breaks):
                starts = np.concatenate([[before], breaks[:-1]])  # the previous break of each break
                gap = breaks - starts
                blank += int(np.count_nonzero(gap == 1))
                pairs = breaks[gap == 2]  # one byte between: blank if it is "\r"
                inside = pairs[pairs >= 1]
                blank += int(np.count_nonzero(text[inside - 1] == 13))
                if len(pairs) and pairs[0] == 0 and last == b"\r":
                    blank += 1  # "\n\r" ending the previous chunk, "\n" starting this one
                before = int(breaks[-1]) - len(chunk)
            else:
                before -= len(chunk)
            last = chunk[-1:]
    return lines, blank, last


def parquet_rows(file: Path, where: str) -> int:
    try:
        return pq.ParquetFile(file).metadata.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read {file} as Parquet: {exc}", where) from None


def ipc_rows(file: Path, where: str) -> int:
    return _ipc_batches(file, where)[1]


def _line_count(file: Path) -> int:
    """Lines in the file: an upper bound on its data rows plus the header (blank lines are skipped)."""
    lines, last = 0, b""
    with file.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last not in (b"", b"\n"))


def read_csv(file: Path, selection: Selection, *, delimiter: str, label_column: Optional[str],
             id_column: Optional[str], where: str) -> FileRead:
    header = csv_header(file, delimiter, where)
    columns = plan_columns(header, file, selection, label_column, id_column, where)
    rows = max(_line_count(file) - 1, 0) if selection.head is None else selection.head
    types = {name: pa.float32() for name in columns.features}
    for name in (label_column, id_column):
        if name is not None:
            types[name] = pa.string()  # ids stay exact; labels are numbers or class names
    convert = pa_csv.ConvertOptions(column_types=types, include_columns=[n for n in header if n in types],
                                    strings_can_be_null=False)
    fill = MatrixFill(rows, columns, file, selection, line_offset=2)
    parse = pa_csv.ParseOptions(delimiter=delimiter)
    try:
        _read_csv_ranges(file, header, parse, convert, fill)
    except pa.ArrowInvalid as exc:
        error = _csv_error(exc, file, header, delimiter, where)
        if not error.message.startswith("cannot read"):
            raise error from None
        # No line is wrong: a split fell inside a quoted field holding a line break. Stream it instead.
        fill = MatrixFill(rows, columns, file, selection, line_offset=2)
        try:
            reader = pa_csv.open_csv(file, read_options=pa_csv.ReadOptions(use_threads=True, block_size=1 << 22),
                                     parse_options=parse, convert_options=convert)
            for batch in reader:
                if not fill.add(batch):
                    break
        except pa.ArrowInvalid as again:
            raise _csv_error(again, file, header, delimiter, where) from None
    if fill.rows == 0:
        raise DataError(f"{file} needs a header row and at least one data row", where)
    return fill.result()


CSV_RANGE_BYTES = 1 << 26  # parsed at a time by Arrow's multi-threaded reader (its table: a few tens of MiB)


def _csv_ranges(file: Path) -> list[tuple[int, int]]:
    """Byte ranges after the header line, each ending at a line break."""
    size = file.stat().st_size
    ranges = []
    with file.open("rb") as handle:
        handle.readline()
        start = handle.tell()
        while start < size:
            handle.seek(min(start + CSV_RANGE_BYTES, size))
            handle.readline()  # on to the end of the line
            end = min(handle.tell(), size)
            ranges.append((start, end))
            start = end
    return ranges


def _read_csv_ranges(file: Path, header: list[str], parse, convert, fill: MatrixFill) -> None:
    """Each range parsed whole by Arrow's multi-threaded reader (as fast as its read_csv of the file),
    the next one parsed while this one is converted: memory stays one range, not the file."""
    read_options = pa_csv.ReadOptions(use_threads=True, column_names=header, block_size=1 << 22)

    def parse_range(bounds: tuple[int, int]) -> pa.Table:
        with file.open("rb") as handle:
            handle.seek(bounds[0])
            data = handle.read(bounds[1] - bounds[0])
        return pa_csv.read_csv(pa.BufferReader(data), read_options=read_options, parse_options=parse,
                               convert_options=convert)

    ranges = _csv_ranges(file)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="csv-read") as pool:
        pending = pool.submit(parse_range, ranges[0]) if ranges else None
        try:
            for i in range(len(ranges)):
                assert pending is not None  # submitted for every part before it is read
                table = pending.result()
                pending = pool.submit(parse_range, ranges[i + 1]) if i + 1 < len(ranges) else None
                for batch in table.to_batches(max_chunksize=BLOCK_ROWS):
                    if not fill.add(batch):
                        return
                del table
        finally:
            if pending is not None:
                pending.cancel()


def _csv_error(exc: Exception, file: Path, header: list[str], delimiter: str, where: str) -> DataError:
    """Arrow names the column but not the line: find it, as the hand-written reader used to say."""
    text = str(exc)
    number = re.search(r"CSV column #(\d+)", text)
    with file.open(newline="", encoding="utf-8-sig") as handle:
        rows = csv.reader(handle, delimiter=delimiter)
        next(rows, None)
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != len(header):
                return DataError(f"{file}:{line} has {len(row)} fields, the header has {len(header)}", where)
            if number is not None:
                at = int(number.group(1))
                try:
                    float(row[at])
                except ValueError:
                    return DataError(f"{file}:{line} column {header[at]!r}: {row[at]!r} is not a number", where)
    return DataError(f"cannot read {file}: {text}", where)


def read_input_csv(file: Path, drop_column: Optional[str], allow_missing: bool, where: str) -> np.ndarray:
    """A prediction input: every column but `drop_column` (the sample ids) is a feature; the header is
    optional (a first line of numbers is data)."""
    header = csv_header(file, ",", where)
    try:
        [float(v) for v in header]
        names = [f"c{i}" for i in range(len(header))]
        has_header = False
    except ValueError:
        names, has_header = header, True
    if drop_column is not None and drop_column not in names:
        raise DataError(f"{file}: id column {drop_column!r} is not in the header {names[:12]}", where)
    selection = Selection(allow_missing=allow_missing)
    columns = plan_columns(names, file, selection, None, drop_column if has_header else None, where)
    types = {n: pa.float32() for n in columns.features}
    fill = MatrixFill(max(_line_count(file) - has_header, 0), Columns(columns.names, columns.features, None, None),
                      file, selection, line_offset=1 + has_header)
    read = pa_csv.ReadOptions(use_threads=True, block_size=1 << 24, column_names=None if has_header else names,
                              skip_rows=0)
    convert = pa_csv.ConvertOptions(column_types=types, include_columns=list(columns.features))
    try:
        for batch in pa_csv.open_csv(file, read_options=read, convert_options=convert):
            fill.add(batch)
    except pa.ArrowInvalid as exc:
        raise _csv_error(exc, file, names, ",", where) from None
    if fill.rows == 0:
        raise DataError(f"{file} has no data rows", where)
    return fill.result().features


# ---------------------------------------------------------------- Parquet

def read_parquet(file: Path, selection: Selection, *, label_column: Optional[str], id_column: Optional[str],
                 where: str) -> FileRead:
    try:
        source = pq.ParquetFile(file)  # read, not mapped: mapped pages would count as this process's memory
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read {file} as Parquet: {exc}", where) from None
    columns = plan_columns(source.schema_arrow.names, file, selection, label_column, id_column, where)
    total = source.metadata.num_rows
    fill = MatrixFill(total if selection.head is None else min(total, selection.head), columns, file, selection, 0)
    extras = [c for c in (label_column, id_column) if c is not None]
    chunks = [columns.features[i:i + COLUMN_CHUNK] for i in range(0, len(columns.features), COLUMN_CHUNK)] or [()]
    starts = np.concatenate([[0], np.cumsum([source.metadata.row_group(g).num_rows
                                             for g in range(source.num_row_groups)])]).astype(int)
    parts = [(g, c) for g in range(source.num_row_groups) if selection.head is None or starts[g] < selection.head
             for c in range(len(chunks))]

    def read(part: tuple[int, int]) -> pa.Table:
        group, chunk = part
        return source.read_row_group(group, columns=list(chunks[chunk]) + (extras if chunk == 0 else []),
                                     use_threads=True)

    # Arrow decodes the next part (its own threads, GIL released) while this one is converted here; a part
    # is one row group's next COLUMN_CHUNK columns, so memory beyond the matrix does not grow with the width.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet-read") as pool:
        pending = pool.submit(read, parts[0]) if parts else None
        try:
            for i, (group, chunk) in enumerate(parts):
                assert pending is not None  # submitted for every part before it is read
                table = pending.result()
                pending = pool.submit(read, parts[i + 1]) if i + 1 < len(parts) else None
                row = int(starts[group])
                for batch in table.to_batches(max_chunksize=BLOCK_ROWS):
                    row += fill.put(batch, row, chunks[chunk], chunk * COLUMN_CHUNK, extras=chunk == 0)
                del table
        except pa.ArrowException as exc:
            raise DataError(f"cannot read {file}: {exc}", where) from None
        finally:
            if pending is not None:
                pending.cancel()
    return fill.result()


# ---------------------------------------------------------------- Arrow IPC / Feather (memory-mapped)

def _ipc_batches(file: Path, where: str) -> tuple[pa.Schema, int, Iterator[pa.RecordBatch]]:
    try:
        source = pa.memory_map(str(file), "r")
        try:
            reader = pa_ipc.open_file(source)
            count = reader.num_record_batches
            rows = sum(reader.get_batch(i).num_rows for i in range(count))  # metadata only: zero-copy
            return reader.schema, rows, (reader.get_batch(i) for i in range(count))
        except pa.ArrowInvalid:
            table = pa_ipc.open_stream(source).read_all()  # the stream format: zero-copy as well
            return table.schema, table.num_rows, iter(table.to_batches())
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read {file} as an Arrow IPC / Feather file: {exc}", where) from None


def tensor_column(schema: pa.Schema, features_column: Optional[str]) -> Optional[str]:
    """The one fixed-size-list<float32> column holding every feature, if the file is laid out that way."""
    if features_column is not None:
        return features_column
    lists = [f.name for f in schema if pa.types.is_fixed_size_list(f.type)]
    return lists[0] if len(lists) == 1 else None


def read_ipc(file: Path, selection: Selection, *, label_column: Optional[str], id_column: Optional[str],
             features_column: Optional[str], where: str) -> FileRead:
    schema, rows, batches = _ipc_batches(file, where)
    tensor = tensor_column(schema, features_column)
    if tensor is not None:
        return _ipc_tensor(file, schema, tensor, rows, list(batches), selection, label_column, id_column, where)
    columns = plan_columns(schema.names, file, selection, label_column, id_column, where)
    fill = MatrixFill(rows if selection.head is None else min(rows, selection.head), columns, file, selection, 0)
    for batch in batches:
        if not fill.add(batch):
            break
    return fill.result()


def _ipc_tensor(file: Path, schema: pa.Schema, tensor: str, rows: int, parts: list[pa.RecordBatch],
                selection: Selection, label_column: Optional[str], id_column: Optional[str], where: str) -> FileRead:
    """Features as one [rows, width] view of the memory map (one record batch, float32, no nulls)."""
    field = schema.field(tensor) if tensor in schema.names else None
    if field is None or not pa.types.is_fixed_size_list(field.type) or field.type.value_type != pa.float32():
        raise DataError(f"{file}: features_column {tensor!r} must be a fixed_size_list<float32> column", where)
    if len(parts) != 1:
        raise DataError(f"{file}: a memory-mapped feature column must be written as one record batch "
                        f"(found {len(parts)}); write it with one batch, or as separate columns", where)
    width = field.type.list_size
    names = [f"{tensor}[{i}]" for i in range(width)]
    others = [n for n in schema.names if n != tensor]
    columns = plan_columns(names + others, file, selection, label_column, id_column, where)
    positions = [names.index(c) for c in columns.features if c in names]
    if len(positions) != len(columns.features):
        raise DataError(f"{file}: only the {tensor!r} column's entries can be features", where)
    values = parts[0].column(tensor)
    if values.null_count or values.values.null_count:
        raise DataError(f"{file}: column {tensor!r} has missing values", where)
    matrix = values.values.to_numpy(zero_copy_only=True).reshape(rows, width)  # still the memory map
    extra = MatrixFill(rows, Columns(columns.names, (), columns.label, columns.ids), file, selection, 0)
    extra.add(parts[0].select([c for c in (label_column, id_column) if c is not None]))
    extras = extra.result()
    return FileRead(mapped_selection(matrix, positions, selection, file)[0], extras.labels, extras.ids,
                    columns.features)
