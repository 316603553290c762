"""Retention: exactly what is kept and removed, through SQL and the CLI, and under load.

Real PostgreSQL with the extension, the ingestion code (or a real receiver), the wrapper's
just-in-time partitions, a real Iceberg table (pyiceberg SQL catalog).  Blocks get backdated
insert times, which is what retention cuts on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import shutil
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path

import psycopg
import pytest
from ingest_helpers import make_request
from spans_helpers import Ingested, make_resource_spans, row_key

from otelspans_fdw import db
from otelspans_fdw.cli_maintenance import add_publish, add_retention
from otelspans_fdw.devcluster import LocalCluster
from otelspans_fdw.lake import refresh
from otelspans_fdw.lake.publish import NAMESPACE, _location, catalog_for
from otelspans_fdw.lake.retention import parse_duration
from otelspans_fdw.objstore import LocalStore

HOUR = dt.timedelta(hours=1)


class Lake:
    """A database with the extension, the server's store in a directory, an ingester."""

    def __init__(self, dsn: str, store_dir: Path):
        self.dsn = dsn
        self.store_dir = store_dir
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.conn.execute("CREATE EXTENSION otelspans")
        self.conn.execute(f"ALTER SERVER otel_spans_server OPTIONS (ADD store '{store_dir}')")
        db.migrate(self.conn)
        self.store = LocalStore(store_dir, durable=False)
        self.ing = Ingested(dsn, self.store)
        row = self.conn.execute(
            "SELECT now(), date_bin('1 hour', now() - interval '7 days', 'epoch')"
        ).fetchone()
        assert row is not None
        self.now, self.boundary = row

    def add(self, service: str, pid: int, insert_time: dt.datetime, seed: int) -> uuid.UUID:
        rs = make_resource_spans(service=service, pid=pid, n=12, seed=seed)
        return self.ing.add(rs, insert_time=insert_time)

    def col(self, sql: str, params: object = None) -> list:
        return [r[0] for r in self.conn.execute(sql, params)]  # type: ignore[arg-type]

    def pid(self, block_id: uuid.UUID) -> uuid.UUID:
        return self.col("SELECT process_id FROM otel_blocks WHERE block_id = %s", (block_id,))[0]

    def spans(self, pids: list[uuid.UUID]) -> list[tuple]:
        rows = self.conn.execute(
            "SELECT block_id, span_id, start_time FROM otel_spans WHERE process_id = ANY(%s)",
            (pids,),
        ).fetchall()
        return sorted((str(r[0]), r[1], r[2]) for r in rows)

    def expected(self, kept: set[uuid.UUID], pids: list[uuid.UUID]) -> list[tuple]:
        """Rows of the kept blocks, computed from the OTLP messages (not from the lake)."""
        ing = Ingested(self.dsn, self.store)
        ing.messages = [m for m in self.ing.messages if m[0] in kept]
        return sorted(row_key(r) for r in ing.expected(pids))

    def partitions(self) -> set[tuple[uuid.UUID, dt.datetime]]:
        return set(map(tuple, self.conn.execute("SELECT process_id, hour FROM otel_partitions")))

    def files_of(self, keys: set[tuple[uuid.UUID, dt.datetime]]) -> set[str]:
        return {
            r[0]
            for r in self.conn.execute("SELECT path, process_id, hour FROM otel_partition_files")
            if (r[1], r[2]) in keys
        }

    def iceberg_paths(self) -> set[str]:
        table = catalog_for(self.dsn, self.store).load_table((NAMESPACE, "otel_spans"))
        return {t.file.file_path for t in table.scan().plan_files()}

    def open_to_backend(self) -> None:
        """Payloads written here (as root) must be deletable by the server's OS user."""
        for root, dirs, files in os.walk(self.store_dir):
            for n in dirs + files:
                os.chmod(os.path.join(root, n), 0o777)


@pytest.fixture
def lake(fresh_dsn: str, pg: LocalCluster) -> Iterator[Lake]:
    store_dir = pg.base / f"store-{uuid.uuid4().hex[:8]}"
    store_dir.mkdir()
    os.chmod(store_dir, 0o777)
    lk = Lake(fresh_dsn, store_dir)
    yield lk
    lk.conn.close()
    shutil.rmtree(store_dir, ignore_errors=True)


def test_parse_duration() -> None:
    assert parse_duration("30m") == dt.timedelta(minutes=30)
    assert parse_duration("12h") == dt.timedelta(hours=12)
    assert parse_duration("7d") == dt.timedelta(days=7)
    assert parse_duration("2w") == dt.timedelta(days=14)
    assert parse_duration("90") == dt.timedelta(seconds=90)
    with pytest.raises(ValueError, match="30m, 12h, 7d"):
        parse_duration("7x")


def test_sql_retention_removes_exactly_the_old_partitions(lake: Lake) -> None:
    b, now = lake.boundary, lake.now
    old_a = [
        lake.add("svc-a", 1, b - dt.timedelta(days=3), 1),
        lake.add("svc-a", 1, b - dt.timedelta(days=3) + dt.timedelta(minutes=10), 2),
        lake.add("svc-a", 1, b - dt.timedelta(seconds=1), 3),
    ]
    # Older than now - 7 days but in the hour holding the cut: the partition is kept whole.
    edge_a = lake.add("svc-a", 1, b + dt.timedelta(seconds=1), 4)
    new_a = lake.add("svc-a", 1, now - HOUR, 5)
    old_b = [
        lake.add("svc-b", 2, b - dt.timedelta(days=2), 6),
        lake.add("svc-b", 2, b - dt.timedelta(days=2) + HOUR, 7),
    ]
    new_c = lake.add("svc-c", 3, now - dt.timedelta(minutes=10), 8)
    pa_, pb, pc = lake.pid(new_a), lake.pid(old_b[0]), lake.pid(new_c)
    pids = [pa_, pb, pc]
    removed, kept = {*old_a, *old_b}, {edge_a, new_a, new_c}

    # Materialise every partition (JIT), then publish them to Iceberg through SQL.
    assert lake.spans(pids) == lake.expected(removed | kept, pids)
    before = lake.partitions()
    old_keys = {k for k in before if k[1] < b}
    assert {k[0] for k in old_keys} == {pa_, pb} and len(old_keys) == 4
    old_files, kept_files = lake.files_of(old_keys), lake.files_of(before - old_keys)
    published = json.loads(lake.col("SELECT otel_publish()::text")[0])
    assert published["added"] == len(old_files | kept_files)
    trace_blocks = set(lake.col("SELECT DISTINCT block_id FROM otel_trace_blocks"))
    assert trace_blocks == removed | kept
    payloads = {
        bid: p for bid, p in lake.conn.execute("SELECT block_id, object_path FROM otel_blocks")
    }
    lake.open_to_backend()

    stats = json.loads(
        lake.col("SELECT otel_retention(interval '7 days', 1, interval '0 seconds')::text")[0]
    )
    assert stats["cut"] == b.astimezone(dt.UTC).isoformat()
    assert (stats["blocks"], stats["payloads"], stats["partitions"]) == (5, 5, 4)
    assert (stats["processes"], stats["streams"]) == (1, 1)
    assert stats["batches"] >= 5 + 1  # batch_size 1: one transaction per block, + processes
    assert stats["partition_files_retired"] == len(old_files)
    assert stats["iceberg_files_removed"] == len(old_files)
    assert stats["files_deleted"] == len(old_files)

    # Metadata: exactly the kept blocks, their trace rows, their partitions, processes A and C.
    assert set(lake.col("SELECT block_id FROM otel_blocks")) == kept
    assert set(lake.col("SELECT DISTINCT block_id FROM otel_trace_blocks")) == kept
    assert lake.partitions() == before - old_keys
    assert set(lake.col("SELECT process_id FROM otel_processes")) == {pa_, pc}
    assert set(lake.col("SELECT process_id FROM otel_streams")) == {pa_, pc}
    assert lake.col("SELECT count(*) FROM otel_retired_files") == [0]
    # Files: payloads and Parquet files of removed partitions gone, the others intact.
    for bid, path in payloads.items():
        assert lake.store.exists(path) == (bid in kept), path
    assert set(lake.store.list("views")) == kept_files
    assert not any(lake.store.exists(p) for p in old_files)
    # Iceberg: the table now lists exactly the kept files.
    assert lake.iceberg_paths() == {_location(lake.store, p) for p in kept_files}
    # Queries: the kept spans, unchanged partitions reused (no rebuild), nothing of B.
    generations = lake.col("SELECT sum(generation) FROM otel_partitions")
    assert lake.spans(pids) == lake.expected(kept, pids)
    assert lake.spans([pb]) == []
    assert lake.col("SELECT sum(generation) FROM otel_partitions") == generations

    again = json.loads(lake.col("SELECT otel_retention('7 days')::text")[0])
    assert again["blocks"] == again["partitions"] == again["processes"] == 0


def run_cli(*argv: str) -> dict:
    parser = argparse.ArgumentParser(prog="otelspans")
    sub = parser.add_subparsers(dest="command", required=True)
    add_retention(sub)
    add_publish(sub)
    args = parser.parse_args(list(argv))
    out = io.StringIO()
    with redirect_stdout(out):
        assert args.func(args) == 0
    return json.loads(out.getvalue())


def test_cli_publish_and_retention_with_grace(lake: Lake) -> None:
    old = lake.add("svc-a", 1, lake.now - dt.timedelta(days=3), 1)
    new = lake.add("svc-a", 1, lake.now - dt.timedelta(minutes=5), 2)
    pid = lake.pid(old)
    assert lake.spans([pid]) == lake.expected({old, new}, [pid])
    common = ("--dsn", lake.dsn, "--store", str(lake.store_dir))
    assert run_cli("publish", *common)["added"] == 2
    with pytest.raises(SystemExit):
        run_cli("retention", "--older-than", "2 days", *common)
    old_files = lake.files_of({k for k in lake.partitions() if k[1] < lake.now - HOUR * 2})
    assert len(old_files) == 1

    stats = run_cli("retention", "--older-than", "2d", "--batch-size", "10", *common)
    assert (stats["blocks"], stats["payloads"], stats["partitions"]) == (1, 1, 1)
    assert stats["iceberg_files_removed"] == 1 and stats["processes"] == 0
    # Default grace: the retired file stays readable for scans that planned before.
    assert stats["files_deleted"] == 0
    assert all(lake.store.exists(p) for p in old_files)
    assert set(lake.col("SELECT path FROM otel_retired_files")) == old_files
    assert lake.spans([pid]) == lake.expected({new}, [pid])

    stats = run_cli("retention", "--older-than", "2d", "--grace", "0s", *common)
    assert stats["blocks"] == 0 and stats["files_deleted"] == 1
    assert not any(lake.store.exists(p) for p in old_files)
    assert len(lake.iceberg_paths()) == 1


def post(url: str, body: bytes) -> int:
    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/x-protobuf"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return int(r.status)


def test_retention_concurrent_with_scans_and_ingestion(lake: Lake, receiver_factory) -> None:
    receiver = receiver_factory(store=lake.store_dir)
    old = [
        lake.add("svc-a", 1, lake.now - dt.timedelta(days=10) + HOUR * (i // 4), 10 + i)
        for i in range(16)
    ]
    kept = {lake.add("svc-a", 1, lake.now - dt.timedelta(minutes=3), 99)}
    pid = lake.pid(old[0])
    # Materialise every partition, then make two old ones stale: scans racing retention
    # refresh those while retention deletes them.
    lake.conn.execute("SELECT count(*) FROM otel_spans WHERE process_id = %s", (pid,))
    old += [
        lake.add("svc-a", 1, lake.now - dt.timedelta(days=10) + HOUR * h, 50 + h) for h in (2, 3)
    ]
    all_rows = {r[:2]: r for r in lake.expected(set(old) | kept, [pid])}
    per_block = {}
    for r in all_rows.values():
        per_block[r[0]] = per_block.get(r[0], 0) + 1

    done = threading.Event()
    errors: list[BaseException] = []
    scans: list[dict[str, int]] = []
    statuses: list[int] = []

    def scanner() -> None:
        try:
            with psycopg.connect(lake.dsn, autocommit=True) as c:
                n = 0
                while not done.is_set() or n < 3:
                    rows = c.execute(
                        "SELECT block_id::text, count(*) FROM otel_spans"
                        " WHERE process_id = %s GROUP BY 1",
                        (pid,),
                    ).fetchall()
                    scans.append(dict(rows))
                    n += 1
        except BaseException as e:
            errors.append(e)

    def ingester() -> None:
        try:
            for i in range(12):
                body = make_request(4, service=f"live-{i % 3}", pid=500 + i % 3, seed=i)
                statuses.append(post(receiver.http_url, body.SerializeToString()))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=scanner), threading.Thread(target=ingester)]
    for t in threads:
        t.start()
    try:
        stats = run_cli(
            "retention", "--older-than", "7d", "--batch-size", "1",
            "--dsn", lake.dsn, "--store", str(lake.store_dir),
        )  # fmt: skip
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert stats["blocks"] == 18 and stats["payloads"] == 18 and stats["partitions"] >= 4
    # Every scan saw whole blocks only, all kept ones, no removed block's spans half-deleted.
    kept_ids = {str(k) for k in kept}
    for seen in scans:
        assert kept_ids <= set(seen)
        assert all(per_block[b] == n for b, n in seen.items()), seen
    # Ingestion went on: every request accepted, every span queryable.
    assert statuses == [200] * 12
    live = lake.col(
        "SELECT count(*) FROM otel_processes p JOIN otel_spans s USING (process_id)"
        " WHERE p.service_name LIKE 'live-%%'"
    )
    assert live == [48]
    assert lake.spans([pid]) == lake.expected(kept, [pid])
    # Retired files outlive the run (grace); collecting them later breaks no query.
    retired = lake.col("SELECT path FROM otel_retired_files")
    assert retired and all(lake.store.exists(p) for p in retired)
    assert refresh.collect_garbage(lake.conn, lake.store, grace_seconds=0) == len(retired)
    assert set(lake.store.list("views")) == set(lake.col("SELECT path FROM otel_partition_files"))
    assert lake.spans([pid]) == lake.expected(kept, [pid])
