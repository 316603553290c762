"""Partition-file footers cached per backend, and row-group selection from their statistics.

Why: a trace lookup reads one or two row groups per file (the trace's time range against files
sorted by ``start_time``), but ``pyarrow.dataset`` parses every footer again on each scan and
evaluates the filter against every row group's statistics; both grow with the file, so a
lookup in a store of 10M spans took 2.5x as long as in a store of 1M while reading the same
rows (bench/RESULTS.md, "Traces").  Partition files are immutable (a refresh writes new files
under new names), so a footer parsed once is valid for the life of the file: this module keeps
the parsed fragment and the per-row-group time bounds in an LRU cache bounded in bytes, picks
the row groups overlapping the window with plain integer comparisons, and scans only those
(``ParquetFileFragment.subset`` keeps the parsed metadata, so the footer is not read again).

Used by the trace route of :mod:`otelspans_fdw.lake.spans`; it builds on the read schema and
format of :mod:`otelspans_fdw.lake.parquet` so that the rows are exactly those of a normal scan.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from otelspans_fdw.lake import parquet
from otelspans_fdw.objstore import ObjectStore
from otelspans_fdw.quals import TimeWindow

__all__ = ["FooterCache", "Selection", "open_selected", "read_trace_rows", "select_row_groups"]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_US = dt.timedelta(microseconds=1)
#: Default bound of the cache: ~100 footers of 1M-row files.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Footer:
    """A parsed file: the fragment (complete metadata) and per-row-group time bounds (µs)."""

    fragment: ds.ParquetFileFragment
    min_start: tuple[int | None, ...]  # min start_time per row group (None: no statistics)
    max_time: tuple[int | None, ...]  # max of start_time and end_time per row group
    nbytes: int


def _us(t: dt.datetime) -> int:
    return (t - _EPOCH) // _US


def _bounds(md: object, col: int, which: str) -> list[int | None]:
    out: list[int | None] = []
    for i in range(md.num_row_groups):  # type: ignore[attr-defined]
        st = md.row_group(i).column(col).statistics  # type: ignore[attr-defined]
        out.append(getattr(st, which + "_raw") if st is not None and st.has_min_max else None)
    return out


class FooterCache:
    """Parsed footers by file path, least recently used evicted beyond ``max_bytes``."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, _Footer] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, store: ObjectStore, path: str) -> _Footer:
        key = store.fs_path(path)
        f = self._items.get(key)
        if f is not None:
            self._items.move_to_end(key)
            return f
        frag = parquet.READ_FORMAT.make_fragment(key, filesystem=store.filesystem)
        frag.ensure_complete_metadata()
        md = frag.metadata
        names = md.schema.names
        s, e = names.index("start_time"), names.index("end_time")
        max_start, max_end = _bounds(md, s, "max"), _bounds(md, e, "max")
        max_time = tuple(
            None if a is None or b is None else max(a, b)
            for a, b in zip(max_start, max_end, strict=True)
        )
        f = _Footer(frag, tuple(_bounds(md, s, "min")), max_time, md.serialized_size)
        self._items[key] = f
        self._bytes += f.nbytes
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.nbytes
        return f


@dataclass(slots=True)
class Selection:
    """Fragments restricted to the row groups that may hold rows of the window."""

    fragments: list[ds.ParquetFileFragment]
    row_groups_read: int = 0
    row_groups_total: int = 0


def select_row_groups(
    cache: FooterCache, store: ObjectStore, paths: list[str], window: TimeWindow
) -> Selection:
    """Row groups overlapping ``window`` (the overlap rule of
    :func:`otelspans_fdw.lake.filters.window_expression`, on statistics)."""
    end = _us(window.end) if window.end is not None else None
    begin = _us(window.begin) if window.begin is not None else None
    sel = Selection([])
    for path in paths:
        f = cache.get(store, path)
        n = len(f.min_start)
        sel.row_groups_total += n
        keep = [
            i
            for i in range(n)
            if (end is None or f.min_start[i] is None or f.min_start[i] <= end)  # type: ignore[operator]
            and (begin is None or f.max_time[i] is None or f.max_time[i] >= begin)  # type: ignore[operator]
        ]
        if keep:
            sel.row_groups_read += len(keep)
            sel.fragments.append(
                f.fragment if len(keep) == n else f.fragment.subset(row_group_ids=keep)
            )
    return sel


def open_selected(
    store: ObjectStore, sel: Selection, columns: list[str], expression: pc.Expression | None
) -> pa.RecordBatchReader:
    """A reader over the selected row groups, with projection and the filter pushed down."""
    if not sel.fragments:
        empty = pa.schema([parquet.READ_SCHEMA.field(c) for c in columns])
        return pa.RecordBatchReader.from_batches(empty, [])
    dataset = ds.FileSystemDataset(
        sel.fragments,
        schema=parquet.READ_SCHEMA,
        format=parquet.READ_FORMAT,
        filesystem=store.filesystem,
    )
    scanner = dataset.scanner(
        columns=list(columns), filter=expression, batch_size=64 * 1024, use_threads=True
    )
    return scanner.to_reader()


def read_trace_rows(
    store: ObjectStore,
    sel: Selection,
    columns: list[str],
    trace_ids: list[str],
    expression: pc.Expression | None,
    filter_columns: list[str],
) -> pa.RecordBatchReader:
    """The rows of ``trace_ids`` in the selected row groups, as :func:`open_selected` gives
    them, decoding the other columns only of row groups that hold one of the traces and
    keeping only those rows before the rest of the filter runs.

    Why: a trace has a few dozen rows among the thousands of the row groups its window keeps,
    and decoding every column of those row groups (JSON text included) was most of a warm
    lookup; the ``trace_id`` column alone is a small fraction of it.  The footers are the
    cached ones (``ParquetFile`` with the fragment's metadata), so nothing is parsed again.
    """
    out_schema = pa.schema([parquet.READ_SCHEMA.field(c) for c in columns])
    wanted = pa.array(sorted(trace_ids), type=pa.utf8())
    needed = list(dict.fromkeys([*columns, *filter_columns]))
    tables: list[pa.Table] = []
    for frag in sel.fragments:
        groups = [rg.id for rg in frag.row_groups]
        if not groups:
            continue
        with store.filesystem.open_input_file(frag.path) as f:
            pf = pq.ParquetFile(
                f, metadata=frag.metadata, read_dictionary=parquet.READ_DICTIONARY_COLUMNS
            )
            ids = pf.read_row_groups(groups, columns=["trace_id"]).column(0)
            mask = pc.is_in(ids, value_set=wanted)
            if not pc.any(mask).as_py():
                continue
            table = pf.read_row_groups(groups, columns=needed).filter(mask)
        if expression is not None:
            table = table.filter(expression)
        tables.append(table.select(columns).cast(out_schema))
    if not tables:
        return pa.RecordBatchReader.from_batches(out_schema, [])
    table = pa.concat_tables(tables)
    return pa.RecordBatchReader.from_batches(out_schema, table.to_batches())
