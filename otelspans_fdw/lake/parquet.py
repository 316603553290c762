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

import contextlib
import datetime as dt
import os
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from otelspans_fdw.objstore import LocalStore, ObjectStore
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
    "write_stream",
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


#: Rows kept in memory before a streamed write spills sorted runs to local disk.  Below it a
#: partition is written as before (sorted in memory, one atomic put); above it memory stays
#: about constant whatever the partition's size.
SPILL_ROWS = 65_536


def write_stream(
    store: ObjectStore,
    process_id: uuid.UUID,
    hour: dt.datetime,
    tables: Iterable[pa.Table],
    *,
    sorted_files: Sequence[str] = (),
) -> WrittenFile | None:
    """Store the rows of ``tables`` (and of the already sorted partition files
    ``sorted_files``) as one new file sorted by start time; None when there are no rows.

    Small inputs go through :func:`write_file`.  Larger ones are an external merge sort: each
    :data:`SPILL_ROWS` of input is sorted and spilled to a local temporary Arrow file (a
    *run*; existing partition files are runs already), then the runs are merged a few row
    groups at a time straight into the store.  Nothing refers to the new file before the
    refresh commits, so a streamed write needs no atomic put: a crash leaves an orphan that
    :func:`otelspans_fdw.lake.refresh.collect_garbage` removes.
    """
    buffered: list[pa.Table] = []
    rows = 0
    with contextlib.ExitStack() as stack:
        spill_dir: str | None = None
        runs: list[_Run] = []
        for t in tables:
            if not t.num_rows:
                continue
            buffered.append(t)
            rows += t.num_rows
            if rows >= SPILL_ROWS:
                if spill_dir is None:
                    spill_dir = stack.enter_context(
                        tempfile.TemporaryDirectory(prefix="otelspans-")
                    )
                runs.append(_spill(spill_dir, len(runs), buffered))
                buffered, rows = [], 0
        if not runs and not sorted_files:
            if not buffered:
                return None
            return write_file(store, process_id, hour, pa.concat_tables(buffered))
        if buffered:
            runs.append(_MemoryRun(pa.concat_tables(buffered).sort_by(SORT_COLUMN)))
            del buffered
        runs[:0] = [_ParquetRun(store, p) for p in sorted_files]
        return _merge(store, file_path(process_id, hour), runs)


class _Run:
    """A source of rows sorted by start time, read a few row groups at a time."""

    def next_batch(self) -> pa.Table | None:
        raise NotImplementedError


class _MemoryRun(_Run):
    def __init__(self, table: pa.Table):
        self.table: pa.Table | None = table

    def next_batch(self) -> pa.Table | None:
        t, self.table = self.table, None
        return t


class _IpcRun(_Run):
    def __init__(self, path: str):
        self.reader = pa.ipc.open_file(pa.OSFile(path))  # not mapped: read batch by batch
        self.i = 0

    def next_batch(self) -> pa.Table | None:
        if self.i >= self.reader.num_record_batches:
            return None
        self.i += 1
        return pa.Table.from_batches([self.reader.get_batch(self.i - 1)])


class _ParquetRun(_Run):
    def __init__(self, store: ObjectStore, path: str):
        f = pq.ParquetFile(store.fs_path(path), filesystem=store.filesystem)
        self.batches = f.iter_batches(batch_size=ROW_GROUP_ROWS)

    def next_batch(self) -> pa.Table | None:
        b = next(self.batches, None)
        return None if b is None else pa.Table.from_batches([b]).cast(arrow_schema())


def _spill(directory: str, n: int, tables: list[pa.Table]) -> _Run:
    """Sort ``tables`` together and write them as one run file (uncompressed Arrow IPC)."""
    table = pa.concat_tables(tables).sort_by(SORT_COLUMN)
    path = os.path.join(directory, f"run-{n}.arrow")
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=ROW_GROUP_ROWS)
    return _IpcRun(path)


def _merge(store: ObjectStore, path: str, runs: list[_Run]) -> WrittenFile | None:
    """Merge sorted ``runs`` into the Parquet file ``path``, in full row groups.

    Each round takes, from every run's buffered rows, those starting no later than the
    smallest "last buffered start" of the runs (nothing still unread can sort before them),
    sorts that slice (a stable sort: ties keep run order, i.e. input order, as one big sort
    would) and writes it.  Memory: a few row groups per run.
    """
    schema = arrow_schema()
    heads: list[pa.Table | None] = [r.next_batch() for r in runs]
    pending: list[pa.Table] = []
    pending_rows = 0
    nb_rows = groups = 0
    lo: dt.datetime | None = None
    hi: dt.datetime | None = None
    writer: pq.ParquetWriter | None = None
    sink = None
    opts = {k: v for k, v in WRITE_OPTIONS.items() if k != "row_group_size"}

    def flush(final: bool) -> None:
        nonlocal pending, pending_rows, writer, sink, nb_rows, groups
        if not pending_rows:
            return
        out = pa.concat_tables(pending)
        cut = out.num_rows if final else out.num_rows - out.num_rows % ROW_GROUP_ROWS
        if cut == 0:
            return
        if writer is None:
            store.ensure_parent(path)
            sink = store.filesystem.open_output_stream(store.fs_path(path))
            writer = pq.ParquetWriter(sink, schema, **opts)
        writer.write_table(out.slice(0, cut), row_group_size=ROW_GROUP_ROWS)
        nb_rows += cut
        groups += -(-cut // ROW_GROUP_ROWS)
        rest = out.slice(cut)
        pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    start = SORT_COLUMN
    while True:
        for i, r in enumerate(runs):
            while heads[i] is not None and heads[i].num_rows == 0:  # type: ignore[union-attr]
                heads[i] = r.next_batch()
        live = [h for h in heads if h is not None]
        if not live:
            break
        cutoff = pa.scalar(
            min(h.column(start)[h.num_rows - 1].value for h in live), schema.field(start).type
        )
        taken = []
        for i, h in enumerate(heads):
            if h is None:
                continue
            n = pc.sum(pc.less_equal(h.column(start), cutoff).cast(pa.int64())).as_py() or 0
            if n:
                taken.append(h.slice(0, n))
                heads[i] = h.slice(n)
        chunk = pa.concat_tables(taken).sort_by(start) if len(taken) > 1 else taken[0]
        t_lo, t_hi = _time_bounds(chunk)
        lo = t_lo if lo is None else min(lo, t_lo)  # type: ignore[type-var]
        hi = t_hi if hi is None else max(hi, t_hi)  # type: ignore[type-var]
        pending.append(chunk.cast(schema))
        pending_rows += chunk.num_rows
        if pending_rows >= ROW_GROUP_ROWS:
            flush(False)
    flush(True)
    if writer is None:
        return None
    writer.close()
    assert sink is not None
    sink.close()
    _sync(store, path)
    size = store.filesystem.get_file_info(store.fs_path(path)).size
    return WrittenFile(path, nb_rows, groups, int(size or 0), lo, hi)


def _sync(store: ObjectStore, path: str) -> None:
    """Make a streamed local file durable, as :meth:`LocalStore.put_if_absent` does."""
    if not isinstance(store, LocalStore) or not store.durable:
        return
    fd = os.open(store.fs_path(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
