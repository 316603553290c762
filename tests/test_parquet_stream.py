"""Streamed partition writes (external merge sort): same file content as one in-memory sort."""

from __future__ import annotations

import datetime as dt
import random
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from spans_helpers import make_resource_spans

from otelspans_fdw.lake import parquet
from otelspans_fdw.lake.decode import BlockInfo, decode_block
from otelspans_fdw.objstore import LocalStore
from otelspans_fdw.schema import SORT_COLUMN

HOUR = dt.datetime(2024, 1, 1, 10, tzinfo=dt.UTC)
PID = uuid.UUID(int=7)


def _tables(n: int, seed: int) -> list[pa.Table]:
    """``n`` blocks of spans whose times interleave (blocks are not in time order)."""
    rnd = random.Random(seed)
    out = []
    for k in range(n):
        rs = make_resource_spans(
            n=600, spacing_ns=rnd.randrange(1, 5000), seed=seed * 100 + k, fancy=False
        )
        info = BlockInfo(PID, uuid.UUID(int=8), uuid.uuid4(), HOUR, service_name="svc")
        out.append(decode_block(rs.SerializeToString(), info))
    rnd.shuffle(out)
    return out


def _check(store: LocalStore, written: parquet.WrittenFile, want: pa.Table) -> None:
    f = pq.ParquetFile(store.fs_path(written.path), filesystem=store.filesystem)
    got = f.read()
    assert written.nb_rows == got.num_rows == want.num_rows
    sizes = [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)]
    assert written.nb_row_groups == len(sizes)
    assert all(s == parquet.ROW_GROUP_ROWS for s in sizes[:-1]) and 0 < sizes[-1]
    starts = got.column(SORT_COLUMN)
    assert pc.all(pc.greater_equal(starts[1:], starts[:-1])).as_py()  # sorted
    key = ["block_id", "span_id"]
    assert got.sort_by([(k, "ascending") for k in key]).equals(
        want.sort_by([(k, "ascending") for k in key])
    )
    assert written.min_time == pc.min(want.column("start_time")).as_py()
    assert written.max_time == pc.max(want.column("end_time")).as_py()
    assert written.size == store.filesystem.get_file_info(store.fs_path(written.path)).size


@pytest.mark.parametrize("spill_rows", [1000, 5000, 10**9])
def test_streamed_write_matches_an_in_memory_sort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spill_rows: int
) -> None:
    monkeypatch.setattr(parquet, "SPILL_ROWS", spill_rows)
    store = LocalStore(tmp_path, durable=True)
    tables = _tables(28, 1)
    written = parquet.write_stream(store, PID, HOUR, iter(tables))
    assert written is not None
    _check(store, written, pa.concat_tables(tables))


def test_streamed_merge_with_existing_files_and_no_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parquet, "SPILL_ROWS", 3000)
    store = LocalStore(tmp_path, durable=False)
    old = [parquet.write_file(store, PID, HOUR, pa.concat_tables(_tables(6, s))) for s in (2, 3)]
    new = _tables(10, 4)
    written = parquet.write_stream(store, PID, HOUR, iter(new), sorted_files=[f.path for f in old])
    assert written is not None
    want = pa.concat_tables([*(parquet.read_table(store, f.path) for f in old), *new])
    _check(store, written, want)
    assert parquet.write_stream(store, PID, HOUR, iter([])) is None
    only_old = parquet.write_stream(store, PID, HOUR, iter([]), sorted_files=[old[0].path])
    assert only_old is not None and only_old.nb_rows == old[0].nb_rows
