"""Partition files: writing them (sorted, zstd, statistics, page index) and scanning them.

Files are sorted by ``start_time`` and cut into row groups of :data:`ROW_GROUP_ROWS` rows, so
each row group covers a short stretch of time and its ``start_time``/``end_time`` statistics
let the reader skip row groups outside a query window; a one-minute window in an hour file
reads one or two row groups.  zstd keeps the JSON columns small; the per-block constant
columns (process, block, exe, ...) dictionary-encode to almost nothing.

Reading goes through ``pyarrow.dataset``: projection (only the asked columns are decoded),
the pushed filter evaluated against row-group statistics and then rows, and a
``RecordBatchReader`` out, which the C host converts without Python work per row.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from otelspans_fdw.objstore import ObjectStore
from otelspans_fdw.schema import (
    COLUMNS,
    LOW_CARDINALITY_COLUMNS,
    SORT_COLUMN,
    TABLE_NAME,
    arrow_schema,
)

__all__ = [
    "ROW_GROUP_ROWS",
    "STATISTICS_COLUMNS",
    "WRITE_OPTIONS",
    "ScanStats",
    "WrittenFile",
    "file_path",
    "open_scan",
    "read_table",
    "write_file",
]

ROW_GROUP_ROWS = 8192
#: Low-cardinality columns worth a dictionary page; trying one on ids and JSON is wasted work.
DICTIONARY_COLUMNS = [c.name for c in COLUMNS if c.name in LOW_CARDINALITY_COLUMNS]

#: Columns with min/max statistics: every column a scan may filter on.  The JSON columns are
#: left out: no filter reads them, and comparing long strings was ~7% of the write time.
STATISTICS_COLUMNS = [c.name for c in COLUMNS if c.sql_type != "jsonb"]

#: ``pyarrow.parquet.write_table`` options of partition files (the benchmark uses them too).
#: zstd level 1: the fastest zstd (level 3 costs more CPU for ~5% smaller files); batches of
#: 8,192 values per encoder call (fewer calls than the default 1,024, same bytes out).
WRITE_OPTIONS: dict[str, Any] = {
    "row_group_size": ROW_GROUP_ROWS,
    "compression": "zstd",
    "compression_level": 1,
    "write_statistics": STATISTICS_COLUMNS,
    "write_page_index": True,
    "use_dictionary": DICTIONARY_COLUMNS,
    "write_batch_size": 8192,
}


@dataclass(frozen=True, slots=True)
class WrittenFile:
    """A Parquet file stored in the object store, with what the index records about it."""

    path: str
    nb_rows: int
    nb_row_groups: int
    size: int
    min_time: dt.datetime | None
    max_time: dt.datetime | None


def file_path(process_id: uuid.UUID, hour: dt.datetime) -> str:
    """A fresh object key for a file of partition ``(process_id, hour)``."""
    h = hour.astimezone(dt.UTC)
    return (
        f"views/{TABLE_NAME}/{process_id}/{h:%Y-%m-%d}/{h:%H}/"
        f"{h:%Y%m%dT%H}_{uuid.uuid4().hex}.parquet"
    )


def _time_bounds(table: pa.Table) -> tuple[dt.datetime | None, dt.datetime | None]:
    """(min start_time, max of start/end): the range any overlap test must use."""
    if table.num_rows == 0:
        return None, None
    lo = pc.min(table.column("start_time")).as_py()
    hi = max(pc.max(table.column("end_time")).as_py(), pc.max(table.column("start_time")).as_py())
    return lo, hi


def write_file(
    store: ObjectStore, process_id: uuid.UUID, hour: dt.datetime, table: pa.Table
) -> WrittenFile:
    """Sort ``table`` by start time and store it as a new Parquet file.

    The file is serialised completely in memory and then created atomically in the store, so
    no reader (and no crash) ever sees half a file.
    """
    table = table.sort_by(SORT_COLUMN) if table.num_rows > 1 else table
    sink = pa.BufferOutputStream()
    pq.write_table(table.cast(arrow_schema()), sink, **WRITE_OPTIONS)
    buf = sink.getvalue()
    path = file_path(process_id, hour)
    store.put_if_absent(path, buf.to_pybytes())
    lo, hi = _time_bounds(table)
    nb_groups = max(1, -(-table.num_rows // ROW_GROUP_ROWS))
    return WrittenFile(path, table.num_rows, nb_groups, buf.size, lo, hi)


def read_table(store: ObjectStore, path: str) -> pa.Table:
    """A whole file (for merges)."""
    return pq.read_table(store.fs_path(path), filesystem=store.filesystem, schema=arrow_schema())


#: Text columns handed to the host dictionary-encoded, straight from the Parquet dictionary
#: pages: the host converts each distinct value once per batch (one jsonb parse of
#: ``process_properties`` per batch instead of per row).
READ_DICTIONARY_COLUMNS = [
    c.name for c in COLUMNS if c.name in LOW_CARDINALITY_COLUMNS and c.arrow_type == pa.utf8()
]
READ_SCHEMA = pa.schema(
    [
        pa.field(f.name, pa.dictionary(pa.int32(), f.type), f.nullable)
        if f.name in READ_DICTIONARY_COLUMNS
        else f
        for f in arrow_schema()
    ]
)
READ_FORMAT = ds.ParquetFileFormat(
    read_options=ds.ParquetReadOptions(dictionary_columns=READ_DICTIONARY_COLUMNS)
)


@dataclass(slots=True)
class ScanStats:
    """What a scan read: shown by EXPLAIN."""

    files: int = 0
    row_groups_total: int = 0
    row_groups_read: int = 0
    columns: list[str] = field(default_factory=list)


def open_scan(
    store: ObjectStore,
    paths: list[str],
    columns: list[str],
    expression: pc.Expression | None,
    *,
    count_row_groups: bool = False,
) -> tuple[pa.RecordBatchReader, ScanStats]:
    """A reader over ``paths`` with projection and filter pushed down.

    ``count_row_groups`` splits fragments by row group to report how many survive the
    statistics (an extra metadata pass: EXPLAIN only).
    """
    stats = ScanStats(files=len(paths), columns=list(columns))
    if not paths:
        empty = pa.schema([READ_SCHEMA.field(c) for c in columns])
        return pa.RecordBatchReader.from_batches(empty, []), stats
    fs_paths = [store.fs_path(p) for p in paths]
    dataset = ds.dataset(
        fs_paths, schema=READ_SCHEMA, format=READ_FORMAT, filesystem=store.filesystem
    )
    if count_row_groups:
        for frag in dataset.get_fragments():
            assert isinstance(frag, ds.ParquetFileFragment)
            stats.row_groups_total += frag.num_row_groups
            kept = frag.split_by_row_group(expression) if expression is not None else [frag]
            stats.row_groups_read += sum(len(k.row_groups) for k in kept)
    scanner = dataset.scanner(
        columns=list(columns),
        filter=expression,
        batch_size=64 * 1024,
        use_threads=True,
    )
    return scanner.to_reader(), stats
