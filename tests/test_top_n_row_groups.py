"""A pushed top-N reads only the row groups whose statistics can reach the answer.

One process-hour of 30,000 spans makes a partition file of four row groups; every query runs
on ``otel_spans`` and on a heap copy of the same rows and must return the same rows, in
order.  Durations are random, longer in the first third, and one span in ten lasts 0 ns, so
an ascending order ties across every row group (all of them must be read) while a
descending one needs only the row groups holding the longest spans.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator

import psycopg
import pyarrow.compute as pc
import pytest
from psycopg.rows import tuple_row
from spans_helpers import T0_NS, make_resource_spans
from test_otel_spans_sql import HOUR_A, SpansDB

from otelspans_fdw.devcluster import LocalCluster
from otelspans_fdw.lake import footers, topn
from otelspans_fdw.lake.parquet import ROW_GROUP_ROWS
from otelspans_fdw.quals import TimeWindow

SPANS = 30_000


@pytest.fixture(scope="module")
def big_hour(pg: LocalCluster) -> Iterator[tuple[SpansDB, uuid.UUID]]:
    name = "t_topn_" + uuid.uuid4().hex[:8]
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    store_dir = pg.base / f"store-{uuid.uuid4().hex[:8]}"
    store_dir.mkdir()
    os.chmod(store_dir, 0o777)
    s = SpansDB(pg.dsn(name), store_dir)
    # a third of the spans every 100 ms (up to 0.5 s long), then the rest every 40 ms (up
    # to 0.2 s): the longest spans are in the first row groups of the file (sorted by time)
    first = SPANS // 3
    bid = s.ing.add(
        make_resource_spans(service="big", pid=3, n=first, seed=5, spacing_ns=100_000_000),
        insert_time=HOUR_A,
    )
    s.ing.add(
        make_resource_spans(
            service="big",
            pid=3,
            n=SPANS - first,
            seed=6,
            base_ns=T0_NS + first * 100_000_000,
            spacing_ns=40_000_000,
        ),
        insert_time=HOUR_A,
    )
    pid = s.pid_of(bid)
    s.conn.execute("CREATE TABLE heap AS SELECT * FROM otel_spans WHERE process_id = %s", (pid,))
    try:
        yield s, pid
    finally:
        s.conn.close()
        with psycopg.connect(pg.dsn(), autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(store_dir, ignore_errors=True)


def _plan(s: SpansDB, sql: str, pid: uuid.UUID) -> str:
    return "\n".join(r["QUERY PLAN"] for r in s.rows("EXPLAIN " + sql, (pid,)))


def _rows(s: SpansDB, sql: str, pid: uuid.UUID) -> list[tuple[object, ...]]:
    with s.conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(sql, (pid,))
        return list(cur.fetchall())


def _row_groups(s: SpansDB, sql: str) -> tuple[int, int]:
    """Row groups the bounded top-N of ``sql``'s ORDER BY / LIMIT reads from the process's
    partition files, and how many they have (the lake's own call, on the files the scan
    wrote; EXPLAIN of a pushed top-N shows the pushed parts, not the files)."""
    m = re.search(r"ORDER BY (\w+)( DESC)?.*LIMIT (\d+)(?: OFFSET (\d+))?", sql)
    assert m, sql
    key, desc, k = m.group(1), bool(m.group(2)), int(m.group(3)) + int(m.group(4) or 0)
    paths = [r["path"] for r in s.rows("SELECT path FROM otel_partition_files ORDER BY path")]
    sel = footers.select_row_groups(footers.FooterCache(), s.store, paths, TimeWindow())
    where = sql.split(" AND ", 1)[1].split(" ORDER BY")[0] if " AND " in sql else None
    expr = _EXPRESSIONS[where] if where else None
    cols = ["span_id", "start_time", "end_time", "duration", "name", "kind", "status"]
    top = topn.read_top_rows(s.store, sel, cols, key, desc, k, expr, cols)
    return top.row_groups_read, sel.row_groups_total


#: The extra conditions below as the lake's filter expressions.
_EXPRESSIONS = {
    "status = 'ERROR'": pc.field("status") == "ERROR",
    "name = 'op-1' AND kind <> 'SERVER'": (pc.field("name") == "op-1")
    & (pc.field("kind") != "SERVER"),
    "duration > 499000000": pc.field("duration") > 499_000_000,
}


W = "WHERE process_id = %s"


@pytest.mark.parametrize(
    ("sql", "fewer"),
    [
        (f"SELECT span_id, duration FROM {{T}} {W} ORDER BY duration DESC, span_id LIMIT 10", True),
        (
            f"SELECT span_id, duration FROM {{T}} {W} ORDER BY duration DESC, span_id LIMIT 100",
            True,
        ),
        (f"SELECT trace_id, name, duration FROM {{T}} {W} ORDER BY duration DESC LIMIT 1", True),
        (
            f"SELECT span_id, status, duration FROM {{T}} {W} AND status = 'ERROR'"
            " ORDER BY duration DESC, span_id LIMIT 5 OFFSET 2",
            True,
        ),
        (f"SELECT span_id, start_time FROM {{T}} {W} ORDER BY start_time DESC LIMIT 20", True),
        (f"SELECT span_id, end_time FROM {{T}} {W} ORDER BY end_time, span_id LIMIT 20", True),
        # 0 ns ties in every row group: all of them hold candidates
        (f"SELECT span_id, duration FROM {{T}} {W} ORDER BY duration, span_id LIMIT 10", False),
        (
            f"SELECT span_id, duration FROM {{T}} {W} ORDER BY duration, span_id DESC"
            " LIMIT 3 OFFSET 40",
            False,
        ),
        (
            f"SELECT span_id FROM {{T}} {W} AND name = 'op-1' AND kind <> 'SERVER'"
            " ORDER BY duration DESC, span_id LIMIT 100",
            False,
        ),
        # fewer rows match than asked for: every row group is read
        (
            f"SELECT span_id FROM {{T}} {W} AND duration > 499000000"
            " ORDER BY duration DESC, span_id LIMIT 100",
            False,
        ),
    ],
)
def test_top_n_equals_postgres_and_reads_only_what_can_hold_it(
    big_hour: tuple[SpansDB, uuid.UUID], sql: str, fewer: bool
) -> None:
    s, pid = big_hour
    got = _rows(s, sql.format(T="otel_spans"), pid)
    want = _rows(s, sql.format(T="heap"), pid)
    assert got == want
    assert got
    assert "Pushed Limit" in _plan(s, sql.format(T="otel_spans"), pid)
    read, total = _row_groups(s, sql)
    assert total == -(-SPANS // ROW_GROUP_ROWS)
    if fewer:
        assert read < total
    else:
        assert read <= total


def test_a_limit_beyond_the_bounded_path_reads_everything_and_agrees(
    big_hour: tuple[SpansDB, uuid.UUID],
) -> None:
    s, pid = big_hour
    sql = f"SELECT span_id, duration FROM {{T}} {W} ORDER BY duration DESC, span_id LIMIT 5000"
    assert _rows(s, sql.format(T="otel_spans"), pid) == _rows(s, sql.format(T="heap"), pid)
