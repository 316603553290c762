"""Iceberg publishing: partition files registered with pyiceberg, read back by DuckDB."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import psycopg
from spans_helpers import Ingested, make_resource_spans

from otelspans_fdw import db
from otelspans_fdw.lake import refresh
from otelspans_fdw.lake.partitions import ensure_schema
from otelspans_fdw.lake.publish import NAMESPACE, catalog_for, publish
from otelspans_fdw.lake.spans import SpansLake
from otelspans_fdw.multicorn_api import Qual
from otelspans_fdw.objstore import LocalStore
from otelspans_fdw.quals import scan_request

HOUR_A = dt.datetime(2024, 1, 1, 10, tzinfo=dt.UTC)


def test_publish_add_remove_and_read_back(fresh_dsn: str, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store", durable=False)
    conn = psycopg.connect(fresh_dsn, autocommit=True)
    db.migrate(conn)
    ensure_schema(conn)
    ing = Ingested(fresh_dsn, store)
    lake = SpansLake(conn, store)
    pids = []
    for p in range(2):
        for k in range(refresh.MAX_FILES + 1):
            bid = ing.add(
                make_resource_spans(service=f"s{p}", pid=p, n=20, seed=100 * p + k),
                insert_time=HOUR_A + dt.timedelta(minutes=k),
            )
            if p == 0 and k < refresh.MAX_FILES:
                lake.scan(scan_request([Qual("process_id", "=", ing_pid(conn, bid))]), ["name"])
        pids.append(ing_pid(conn, bid))
        if p == 0:
            stats = publish(conn, fresh_dsn, store, batch=3, materialise=False)
            assert stats.added == refresh.MAX_FILES and stats.snapshots == 3
    # The next scan merges process 0's deltas (retiring files) and materialises process 1.
    lake.scan(scan_request([Qual("process_id", ("=", True), pids)]), ["name"])
    retired = [r[0] for r in conn.execute("SELECT path FROM otel_retired_files")]
    assert retired
    # Retired but still published: garbage collection must keep them.
    assert refresh.collect_garbage(conn, store, grace_seconds=0) == 0
    stats = publish(conn, fresh_dsn, store)
    assert stats.removed == len(retired) and stats.added >= 2
    want = {r["span_id"] for r in ing.expected()}
    assert len(want) == 2 * 20 * (refresh.MAX_FILES + 1)

    table = catalog_for(fresh_dsn, store).load_table((NAMESPACE, "otel_spans"))
    arrow = table.scan(selected_fields=("span_id", "name")).to_arrow()
    assert sorted(arrow.column("span_id").to_pylist()) == sorted(want)

    files = [t.file.file_path for t in table.scan().plan_files()]
    con = duckdb.connect()
    paths = ", ".join(f"'{f.removeprefix('file://')}'" for f in files)
    n = con.execute(f"SELECT count(DISTINCT span_id) FROM read_parquet([{paths}])").fetchone()
    assert n == (len(want),)
    assert refresh.collect_garbage(conn, store, grace_seconds=0) == len(retired)
    conn.close()


def ing_pid(conn: psycopg.Connection, block_id: object) -> object:
    row = conn.execute("SELECT process_id FROM otel_blocks WHERE block_id = %s", (block_id,))
    return row.fetchone()[0]
