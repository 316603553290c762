"""The lake over a real PostgreSQL and a real local object store: JIT partitions and scans.

Blocks are written with the ingestion code (payload in the store, then metadata rows), with
insert times forced to chosen hours; every scan result is compared with rows computed
independently from the OTLP messages (tests/spans_helpers.py).
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from spans_helpers import (
    T0_NS,
    Ingested,
    arrow_rows,
    make_resource_spans,
    ns_to_dt,
    overlapping,
    row_key,
)

from otelspans_fdw import db
from otelspans_fdw.lake import refresh
from otelspans_fdw.lake.partitions import ensure_schema
from otelspans_fdw.lake.spans import SpansLake
from otelspans_fdw.multicorn_api import Qual
from otelspans_fdw.objstore import LocalStore
from otelspans_fdw.quals import ScanRequest, TimeWindow, scan_request
from otelspans_fdw.schema import COLUMN_NAMES

T0 = ns_to_dt(T0_NS)
HOUR_A = dt.datetime(2024, 1, 1, 10, tzinfo=dt.UTC)


class Env:
    def __init__(self, dsn: str, store_dir: Path):
        self.dsn = dsn
        self.store = LocalStore(store_dir, durable=False)
        self.conn = psycopg.connect(dsn, autocommit=True)
        db.migrate(self.conn)
        ensure_schema(self.conn)
        self.ing = Ingested(dsn, self.store)
        self.warnings: list[str] = []
        self.lake = SpansLake(self.conn, self.store, warn=self.warnings.append)

    def scan(
        self, req: ScanRequest, columns: tuple[str, ...] = COLUMN_NAMES
    ) -> tuple[list, object]:
        reader, report = self.lake.scan(req, list(columns), count_row_groups=True)
        return sorted(arrow_rows(reader.read_all()), key=row_key), report

    def pid_of(self, block_id: uuid.UUID) -> uuid.UUID:
        return self.conn.execute(
            "SELECT process_id FROM otel_blocks WHERE block_id = %s", (block_id,)
        ).fetchone()[0]

    def one(self, sql: str, params: object = None) -> object:
        return self.conn.execute(sql, params).fetchone()[0]


@pytest.fixture
def env(fresh_dsn: str, tmp_path: Path) -> Iterator[Env]:
    e = Env(fresh_dsn, tmp_path / "store")
    yield e
    e.conn.close()


def req(pids: list[uuid.UUID], begin: dt.datetime | None = None, end: dt.datetime | None = None):
    quals = [Qual("process_id", ("=", True), pids)]
    if begin is not None:
        quals.append(Qual("end_time", ">=", begin))
    if end is not None:
        quals.append(Qual("start_time", "<=", end))
    return scan_request(quals)


def test_many_windows_several_processes(env: Env) -> None:
    """Three processes, blocks in three insert hours; random windows incl. edge crossings."""
    pids = []
    for p in range(3):
        for k in range(3):
            rs = make_resource_spans(
                service=f"svc{p}",
                pid=p,
                n=60,
                seed=10 * p + k,
                base_ns=T0_NS + k * 60 * 10**9,
                spacing_ns=1_000_000_000,
            )
            bid = env.ing.add(rs, insert_time=HOUR_A + dt.timedelta(hours=k, minutes=p))
        pids.append(env.pid_of(bid))
    rows_all = env.ing.expected()
    assert len(rows_all) == 3 * 3 * 60
    got, report = env.scan(req(pids))
    assert got == rows_all
    assert report.refreshed == 9 and report.partitions == 9
    rnd = random.Random(4)
    for i in range(25):
        sub = rnd.sample(pids, rnd.randrange(1, 4))
        a = T0 + dt.timedelta(seconds=rnd.uniform(-10, 250))
        b = a + dt.timedelta(seconds=rnd.choice([0, 0.5, 3, 30, 120]))
        want = overlapping(env.ing.expected(sub), a, b)
        got, report = env.scan(req(sub, a, b), COLUMN_NAMES)
        assert got == want, (i, a, b)
        assert report.refreshed == 0
    crossing = [
        r
        for r in rows_all
        if r["start_time"] < T0 + dt.timedelta(seconds=30)
        and r["end_time"] > T0 + dt.timedelta(seconds=31)
    ]
    assert crossing, "the data has spans crossing a window edge"
    got, _ = env.scan(req(pids, T0 + dt.timedelta(seconds=30), T0 + dt.timedelta(seconds=31)))
    assert {r["span_id"] for r in crossing} <= {r["span_id"] for r in got}


def test_projection_and_row_group_pruning(env: Env) -> None:
    bid = env.ing.add(
        make_resource_spans(n=40_000, fancy=False, spacing_ns=50_000_000, malformed=False),
        insert_time=HOUR_A,
    )
    pid = env.pid_of(bid)
    a = T0 + dt.timedelta(seconds=1000)
    reader, report = env.lake.scan(
        req([pid], a, a + dt.timedelta(minutes=1)), ["name", "start_time"], count_row_groups=True
    )
    table = reader.read_all()
    assert table.column_names == ["name", "start_time"]
    want = overlapping(env.ing.expected([pid]), a, a + dt.timedelta(minutes=1))
    assert table.num_rows == len(want) > 0
    assert report.row_groups_total is not None and report.row_groups_total >= 4
    assert report.row_groups_read is not None and report.row_groups_read <= 2


def test_new_blocks_are_materialised_as_deltas(env: Env) -> None:
    bid = env.ing.add(make_resource_spans(n=50, seed=1), insert_time=HOUR_A)
    pid = env.pid_of(bid)
    got, report = env.scan(req([pid]))
    assert report.refreshed == 1 and report.blocks_decoded == 1 and len(got) == 50
    got, report = env.scan(req([pid]))
    assert report.refreshed == 0 and report.reused == 1
    env.ing.add(make_resource_spans(n=30, seed=2), insert_time=HOUR_A + dt.timedelta(minutes=5))
    got, report = env.scan(req([pid]))
    assert report.blocks_decoded == 1, "only the new block is decoded"
    assert got == env.ing.expected([pid]) and len(got) == 80
    assert env.one("SELECT count(*) FROM otel_partition_files") == 2
    assert env.one("SELECT generation FROM otel_partitions") == 2


def test_late_block_for_an_old_hour_is_seen_next_query(env: Env) -> None:
    bid = env.ing.add(make_resource_spans(n=20, seed=3), insert_time=HOUR_A)
    pid = env.pid_of(bid)
    w = (T0 - dt.timedelta(seconds=1), T0 + dt.timedelta(seconds=100))
    got, _ = env.scan(req([pid], *w))
    assert len(got) == 20
    # A late block: old spans (same event window), inserted now (a new insert hour).
    env.ing.add(make_resource_spans(n=15, seed=4, base_ns=T0_NS + 10**9))
    got, report = env.scan(req([pid], *w))
    assert report.refreshed == 1 and report.partitions == 2
    assert got == overlapping(env.ing.expected([pid]), *w) and len(got) == 35


def test_merge_retire_and_garbage_collection(env: Env) -> None:
    pid = None
    for k in range(refresh.MAX_FILES + 2):
        bid = env.ing.add(
            make_resource_spans(n=10, seed=100 + k), insert_time=HOUR_A + dt.timedelta(minutes=k)
        )
        pid = env.pid_of(bid)
        env.scan(req([pid]))
    assert pid is not None
    nfiles = env.one("SELECT count(*) FROM otel_partition_files")
    assert 1 <= nfiles <= refresh.MAX_FILES
    retired = [r[0] for r in env.conn.execute("SELECT path FROM otel_retired_files")]
    assert retired and all(env.store.exists(p) for p in retired)
    got, _ = env.scan(req([pid]))
    assert got == env.ing.expected([pid]) and len(got) == 10 * (refresh.MAX_FILES + 2)
    assert refresh.collect_garbage(env.conn, env.store, grace_seconds=3600) == 0
    assert refresh.collect_garbage(env.conn, env.store, grace_seconds=0) == len(retired)
    assert not any(env.store.exists(p) for p in retired)
    orphan = "views/otel_spans/x/orphan.parquet"
    env.store.put_if_absent(orphan, b"PAR1")
    assert refresh.collect_garbage(env.conn, env.store, grace_seconds=0, orphans=True) == 1
    assert not env.store.exists(orphan)
    got, _ = env.scan(req([pid]))
    assert len(got) == 10 * (refresh.MAX_FILES + 2)


def test_undecodable_block_is_reported_recorded_and_not_retried(env: Env) -> None:
    good = env.ing.add(make_resource_spans(n=10, seed=7), insert_time=HOUR_A)
    pid = env.pid_of(good)
    bad = uuid.uuid4()
    path = f"blobs/{pid}/x/{bad}"
    env.store.put_if_absent(path, b"\x0a\xff\xff\xff\xff\x0f not protobuf")
    env.conn.execute(
        "INSERT INTO otel_blocks (block_id, stream_id, process_id, begin_time, end_time,"
        " nb_spans, payload_size, object_path, insert_time)"
        " SELECT %s, stream_id, process_id, begin_time, end_time, 3, 20, %s, insert_time"
        " FROM otel_blocks WHERE block_id = %s",
        (bad, path, good),
    )
    got, report = env.scan(req([pid]))
    assert len(got) == 10 and report.blocks_failed == 1
    assert len(env.warnings) == 1 and str(bad) in env.warnings[0]
    assert env.one("SELECT count(*) FROM otel_block_errors WHERE block_id = %s", (bad,)) == 1
    got, report = env.scan(req([pid]))
    assert len(got) == 10 and report.refreshed == 0 and len(env.warnings) == 1


def test_unknown_process_and_empty_requests(env: Env) -> None:
    env.ing.add(make_resource_spans(n=5), insert_time=HOUR_A)
    assert env.scan(req([uuid.uuid4()]))[0] == []
    assert env.scan(scan_request([Qual("process_id", "=", None)]))[0] == []
    assert env.lake.estimate(req([uuid.uuid4()])) == 0


def test_schema_version_change_rebuilds(env: Env) -> None:
    bid = env.ing.add(make_resource_spans(n=25, seed=9), insert_time=HOUR_A)
    pid = env.pid_of(bid)
    env.scan(req([pid]))
    env.conn.execute("UPDATE otel_partitions SET schema_version = 0")
    got, report = env.scan(req([pid]))
    assert report.refreshed == 1 and got == env.ing.expected([pid])
    assert env.one("SELECT count(*) FROM otel_partition_files") == 1
    assert env.one("SELECT count(*) FROM otel_retired_files") == 1


def test_concurrent_scans_build_each_partition_once(env: Env) -> None:
    pids = []
    for k in range(4):
        bid = env.ing.add(
            make_resource_spans(pid=k, n=300, seed=k),
            insert_time=HOUR_A + dt.timedelta(hours=k % 2),
        )
        pids.append(env.pid_of(bid))
    results: list[list] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        try:
            with psycopg.connect(env.dsn, autocommit=True) as c:
                lake = SpansLake(c, env.store)
                barrier.wait()
                reader, _ = lake.scan(req(pids), list(COLUMN_NAMES))
                results.append(sorted(arrow_rows(reader.read_all()), key=row_key))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    want = env.ing.expected()
    assert len(results) == 8 and all(r == want for r in results)
    assert env.one("SELECT max(generation) FROM otel_partitions") == 1
    assert env.one("SELECT count(*) FROM otel_partition_files") == 4


def test_window_selects_partitions(env: Env) -> None:
    """Only partitions whose blocks overlap the window are refreshed."""
    b1 = env.ing.add(make_resource_spans(n=10, seed=1), insert_time=HOUR_A)
    env.ing.add(
        make_resource_spans(n=10, seed=2, base_ns=T0_NS + 7200 * 10**9),
        insert_time=HOUR_A + dt.timedelta(hours=2),
    )
    pid = env.pid_of(b1)
    got, report = env.scan(req([pid], T0, T0 + dt.timedelta(seconds=5)))
    assert report.partitions == 1 and report.refreshed == 1
    assert got == overlapping(env.ing.expected([pid]), T0, T0 + dt.timedelta(seconds=5))
    assert env.lake.plan(req([pid])).stale == 1
    assert TimeWindow() == req([pid]).window


def test_lock_key_is_the_same_instant_in_any_time_zone() -> None:
    import datetime as _dt
    import uuid as _uuid

    from otelspans_fdw.lake.partitions import lock_key

    pid = _uuid.uuid4()
    utc = _dt.datetime(2024, 5, 1, 13, tzinfo=_dt.UTC)
    paris = utc.astimezone(_dt.timezone(_dt.timedelta(hours=2)))
    assert lock_key(pid, utc) == lock_key(pid, paris)
    assert lock_key(pid, utc) != lock_key(pid, utc + _dt.timedelta(hours=1))


def test_partition_bigger_than_memory_budget_streams(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past SPILL_ROWS a refresh spills sorted runs and merges them; same rows, same scans."""
    from otelspans_fdw.lake import decode, parquet

    monkeypatch.setattr(parquet, "SPILL_ROWS", 700)
    monkeypatch.setattr(decode, "BATCH_BYTES", 20_000)  # several decode batches
    bids = [
        env.ing.add(make_resource_spans(n=300, seed=500 + k), insert_time=HOUR_A) for k in range(8)
    ]
    pid = env.pid_of(bids[0])
    got, _ = env.scan(req([pid]))
    assert got == env.ing.expected([pid]) and len(got) > 2000
    assert env.one("SELECT count(*) FROM otel_partition_files") == 1
    w0 = T0 + dt.timedelta(milliseconds=2)
    got, _ = env.scan(req([pid], w0, w0 + dt.timedelta(milliseconds=3)))
    assert got == overlapping(env.ing.expected([pid]), w0, w0 + dt.timedelta(milliseconds=3))
