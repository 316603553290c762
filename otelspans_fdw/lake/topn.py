"""Top-N over spans by a numeric column, reading only the row groups that can hold the answer.

Why: ``ORDER BY duration DESC LIMIT 10`` over an hour of 1M spans decoded every projected
column of every row group (ids and names as text) to keep ten rows, ten times DuckDB's time
over the same files (bench/RESULTS.md, "Dashboard questions").  Each row group's footer
statistics bound its ``duration`` (and times): once ``k`` candidate rows are held, a row group
whose bound cannot reach the k-th candidate's key cannot hold a row of the answer, whatever
the other sort keys and filters.  Row groups are read best bound first, so on unsorted keys a
handful of the hundreds are decoded; on a key the files are sorted by (``start_time``) the
first ones read already hold the answer.

The result is a superset of the answer (every row whose key ties the k-th is kept): the
caller orders it on all its keys and cuts it, exactly as for a full read.  Only keys that are
never NULL and whose statistics are plain integers are offered (:data:`KEYS`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from otelspans_fdw.lake import parquet
from otelspans_fdw.lake.footers import Selection
from otelspans_fdw.objstore import ObjectStore

__all__ = ["KEYS", "TopRows", "read_top_rows"]

#: Columns a top-N may be bounded by: NOT NULL, statistics as int64 (µs or ns).
KEYS = frozenset({"duration", "start_time", "end_time", "insert_time"})


@dataclass(slots=True)
class TopRows:
    """The candidate rows and how many row groups were decoded to find them."""

    table: pa.Table
    row_groups_read: int
    row_groups_total: int


@dataclass(frozen=True, slots=True)
class _Group:
    bound: int | None  # best key value the row group can hold (None: no statistics)
    fragment_index: int
    row_group: int


def _groups(sel: Selection, key: str, descending: bool) -> Iterator[_Group]:
    for fi, frag in enumerate(sel.fragments):
        md = frag.metadata
        col = md.schema.names.index(key)
        for rg in frag.row_groups:
            st = md.row_group(rg.id).column(col).statistics
            bound = None
            if st is not None and st.has_min_max:
                bound = st.max_raw if descending else st.min_raw
            yield _Group(bound, fi, rg.id)


def _key_ints(table: pa.Table, key: str) -> pa.Array:
    return pc.cast(table.column(key), pa.int64()).combine_chunks()


def read_top_rows(
    store: ObjectStore,
    sel: Selection,
    columns: Sequence[str],
    key: str,
    descending: bool,
    k: int,
    expression: pc.Expression | None,
    filter_columns: Sequence[str],
) -> TopRows:
    """Rows of the selected row groups (``expression`` applied) holding the ``k`` best by
    ``key``, with every row tying the k-th; columns ``columns`` in the read schema's types."""
    if key not in KEYS or k <= 0:
        raise ValueError(f"top-N bounded by {key!r} with k={k}")
    out_schema = pa.schema([parquet.READ_SCHEMA.field(c) for c in columns])
    needed = list(dict.fromkeys([*columns, *filter_columns, key]))
    groups = list(_groups(sel, key, descending))
    # best bound first; row groups without statistics first of all (they bound nothing)
    sign = -1 if descending else 1
    groups.sort(key=lambda g: (g.bound is not None, sign * (g.bound or 0)))
    held: list[pa.Table] = []  # candidate rows (``columns``)
    held_keys: list[pa.Array] = []  # their keys as int64, in step with ``held``
    nheld = 0
    kth: int | None = None  # the k-th best key held (once k rows are held)
    beats = pc.greater_equal if descending else pc.less_equal
    read = 0
    for g in groups:
        if kth is not None and g.bound is not None:
            if (g.bound < kth) if descending else (g.bound > kth):
                break  # sorted by bound: no later row group can reach the k-th either
        frag = sel.fragments[g.fragment_index]
        with store.filesystem.open_input_file(frag.path) as f:
            pf = pq.ParquetFile(
                f, metadata=frag.metadata, read_dictionary=parquet.READ_DICTIONARY_COLUMNS
            )
            table = pf.read_row_group(g.row_group, columns=needed)
        read += 1
        if expression is not None:
            table = table.filter(expression)
        keys = pc.cast(table.column(key), pa.int64()).combine_chunks()
        if kth is not None:
            mask = beats(keys, kth)
            table, keys = table.filter(mask), keys.filter(mask)
        if not len(keys):
            continue
        held.append(table.select(list(columns)))
        held_keys.append(keys)
        nheld += len(keys)
        if nheld >= k:
            all_keys = pa.concat_arrays(held_keys)
            pick = pc.top_k_unstable if descending else pc.bottom_k_unstable
            best = all_keys.take(pick(all_keys, k=k))  # (they return indices)
            kth = (pc.min(best) if descending else pc.max(best)).as_py()
            if nheld > 4 * k:  # drop what can no longer be part of the answer
                held = [t.filter(beats(ks, kth)) for t, ks in zip(held, held_keys, strict=True)]
                held_keys = [ks.filter(beats(ks, kth)) for ks in held_keys]
                nheld = sum(len(ks) for ks in held_keys)
    if not held:
        return TopRows(out_schema.empty_table(), read, len(groups))
    table = pa.concat_tables(held)
    if kth is not None:
        table = table.filter(beats(pa.concat_arrays(held_keys), kth))
    table = table.cast(out_schema)
    return TopRows(table, read, len(groups))
