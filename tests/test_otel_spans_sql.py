"""otel_spans end to end through SQL: the host, the wrapper, the lake, a real object store.

Blocks are written with the ingestion code; every result is compared with rows computed
independently from the OTLP messages (tests/spans_helpers.py).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors
from psycopg.rows import dict_row
from spans_helpers import T0_NS, Ingested, make_resource_spans, ns_to_dt, overlapping, row_key

from otelspans_fdw import db
from otelspans_fdw.devcluster import LocalCluster
from otelspans_fdw.lake import refresh
from otelspans_fdw.lake.partitions import ensure_schema
from otelspans_fdw.objstore import LocalStore
from otelspans_fdw.schema import COLUMN_NAMES, COLUMNS
from otelspans_fdw.sqlgen import otel_spans_sql

ROOT = Path(__file__).resolve().parent.parent
T0 = ns_to_dt(T0_NS)
HOUR_A = dt.datetime(2024, 1, 1, 10, tzinfo=dt.UTC)
PG_TYPES = {
    "uuid": "uuid",
    "timestamptz": "timestamp with time zone",
    "text": "text",
    "jsonb": "jsonb",
    "bigint": "bigint",
}


class SpansDB:
    def __init__(self, dsn: str, store_dir: Path):
        self.dsn = dsn
        self.conn = psycopg.connect(dsn, autocommit=True, row_factory=dict_row)
        self.notices: list[str] = []
        self.conn.add_notice_handler(lambda d: self.notices.append(d.message_primary or ""))
        self.conn.execute("CREATE EXTENSION otelspans")
        if self.conn.execute("SELECT to_regclass('otel_spans') AS t").fetchone()["t"] is None:
            self.conn.execute(otel_spans_sql())
        self.conn.execute(f"ALTER SERVER otel_spans_server OPTIONS (ADD store '{store_dir}')")
        with psycopg.connect(dsn, autocommit=True) as c:
            db.migrate(c)
        self.store = LocalStore(store_dir, durable=False)
        self.ing = Ingested(dsn, self.store)

    def rows(self, sql: str, params: object = None, **kw: object) -> list[dict]:
        return self.conn.execute(sql, params, **kw).fetchall()  # type: ignore[arg-type]

    def spans(self, sql: str, params: object = None, **kw: object) -> list[dict]:
        return sorted(self.rows(sql, params, **kw), key=row_key)

    def pid_of(self, block_id: uuid.UUID) -> uuid.UUID:
        return self.rows("SELECT process_id FROM otel_blocks WHERE block_id = %s", (block_id,))[0][
            "process_id"
        ]


@pytest.fixture
def sdb(fresh_dsn: str, pg: LocalCluster) -> Iterator[SpansDB]:
    store_dir = pg.base / f"store-{uuid.uuid4().hex[:8]}"
    store_dir.mkdir()
    os.chmod(store_dir, 0o777)
    s = SpansDB(fresh_dsn, store_dir)
    yield s
    s.conn.close()
    shutil.rmtree(store_dir, ignore_errors=True)


def test_sql_fragment_is_generated_from_the_schema() -> None:
    assert (ROOT / "sql" / "otel_spans.sql.in").read_text() == otel_spans_sql()


def test_installed_columns_match_the_schema(sdb: SpansDB) -> None:
    rows = sdb.rows(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_name = 'otel_spans' ORDER BY ordinal_position"
    )
    assert [(r["column_name"], r["data_type"]) for r in rows] == [
        (c.name, PG_TYPES[c.sql_type]) for c in COLUMNS
    ]
    ft = sdb.rows(
        "SELECT table_type FROM information_schema.tables WHERE table_name = 'otel_spans'"
    )
    assert ft == [{"table_type": "FOREIGN"}]


def ingest_processes(sdb: SpansDB, n: int = 2, blocks: int = 2) -> list[uuid.UUID]:
    pids = []
    for p in range(n):
        for k in range(blocks):
            bid = sdb.ing.add(
                make_resource_spans(
                    service=f"svc{p}", pid=p, n=40, seed=p * 10 + k, base_ns=T0_NS + k * 30 * 10**9
                ),
                insert_time=HOUR_A + dt.timedelta(hours=k),
            )
        pids.append(sdb.pid_of(bid))
    return pids


def test_select_star_matches_independent_rows(sdb: SpansDB) -> None:
    pids = ingest_processes(sdb)
    for pid in pids:
        got = sdb.spans("SELECT * FROM otel_spans WHERE process_id = %s", (pid,))
        want = sdb.ing.expected([pid])
        assert len(got) == 80 and got == want
    got = sdb.spans("SELECT * FROM otel_spans WHERE process_id = ANY(%s)", (pids,))
    assert got == sdb.ing.expected(pids)
    got = sdb.spans(f"SELECT * FROM otel_spans WHERE process_id IN ('{pids[0]}', '{pids[1]}')")
    assert len(got) == 160


def test_windows_with_constants_between_and_generic_plans(sdb: SpansDB) -> None:
    pids = ingest_processes(sdb)
    all_rows = sdb.ing.expected(pids)
    rnd = random.Random(1)
    sdb.conn.execute("SET plan_cache_mode = force_generic_plan")
    for i in range(12):
        pid = rnd.choice(pids)
        a = T0 + dt.timedelta(seconds=rnd.uniform(-5, 80))
        b = a + dt.timedelta(seconds=rnd.choice([0, 1, 5, 20]))
        want = overlapping([r for r in all_rows if r["process_id"] == pid], a, b)
        got = sdb.spans(
            "SELECT * FROM otel_spans WHERE process_id = %s AND end_time >= %s"
            " AND start_time <= %s",
            (pid, a, b),
            prepare=True,
        )
        assert got == want, i
        want_between = [r for r in all_rows if r["process_id"] == pid and a <= r["start_time"] <= b]
        got = sdb.spans(
            "SELECT * FROM otel_spans WHERE process_id = %s AND start_time BETWEEN %s AND %s",
            (pid, a, b),
        )
        assert got == sorted(want_between, key=row_key)
    got = sdb.rows(
        "SELECT count(*) AS n FROM otel_spans WHERE process_id = %s AND status = 'ERROR'"
        " AND kind = ANY(%s) AND duration > 0",
        (pids[0], ["SERVER", "CLIENT"]),
    )
    want_n = sum(
        1
        for r in all_rows
        if r["process_id"] == pids[0]
        and r["status"] == "ERROR"
        and r["kind"] in ("SERVER", "CLIENT")
        and r["duration"] > 0
    )
    assert got == [{"n": want_n}] and want_n > 0


def test_missing_process_id_is_an_error_with_a_hint(sdb: SpansDB) -> None:
    ingest_processes(sdb, n=1, blocks=1)
    with pytest.raises(errors.InvalidParameterValue) as e:
        sdb.rows("SELECT * FROM otel_spans WHERE name = 'x'")
    assert "process_id" in e.value.diag.message_primary
    hint = e.value.diag.message_hint or ""
    assert "process_id =" in hint and "JOIN otel_spans" in hint


def test_unknown_process_has_no_rows(sdb: SpansDB) -> None:
    ingest_processes(sdb, n=1, blocks=1)
    assert sdb.rows("SELECT * FROM otel_spans WHERE process_id = %s", (uuid.uuid4(),)) == []


def test_join_with_processes_is_a_parameterized_nested_loop(sdb: SpansDB) -> None:
    pids = ingest_processes(sdb, n=3, blocks=1)
    sql = (
        "SELECT s.* FROM otel_processes p JOIN otel_spans s USING (process_id)"
        " WHERE p.exe = ANY(%s)"
    )
    plan = "\n".join(r["QUERY PLAN"] for r in sdb.rows("EXPLAIN " + sql, (["svc0", "svc2"],)))
    assert "Nested Loop" in plan and "Foreign Scan on otel_spans" in plan, plan
    got = sdb.spans(sql, (["svc0", "svc2"],))
    assert got == sdb.ing.expected([pids[0], pids[2]])
    got = sdb.rows(
        "SELECT p.exe, count(*) AS n FROM otel_processes p JOIN otel_spans s USING (process_id)"
        " WHERE s.status = 'ERROR' GROUP BY 1 ORDER BY 1"
    )
    want = {}
    for r in sdb.ing.expected(pids):
        if r["status"] == "ERROR":
            want[r["exe"]] = want.get(r["exe"], 0) + 1
    assert [(r["exe"], r["n"]) for r in got] == sorted(want.items())


def test_function_and_lateral(sdb: SpansDB) -> None:
    pids = ingest_processes(sdb, n=2, blocks=2)
    a, b = T0 + dt.timedelta(seconds=10), T0 + dt.timedelta(seconds=20)
    got = sdb.spans("SELECT * FROM otel_spans(%s, %s, %s)", (pids[0], a, b))
    assert got == overlapping(sdb.ing.expected([pids[0]]), a, b)
    assert sdb.spans("SELECT * FROM otel_spans(%s)", (pids[1],)) == sdb.ing.expected([pids[1]])
    got = sdb.spans(
        "SELECT s.* FROM otel_processes p, LATERAL otel_spans(p.process_id, %s, %s) s",
        (a, b),
    )
    assert got == overlapping(sdb.ing.expected(pids), a, b)


def test_server_side_cursor_and_projection(sdb: SpansDB) -> None:
    pids = ingest_processes(sdb, n=1, blocks=2)
    with psycopg.connect(sdb.dsn) as c, c.cursor(name="spans") as cur:
        cur.itersize = 7
        cur.execute("SELECT span_id, duration FROM otel_spans WHERE process_id = %s", (pids[0],))
        got = sorted(cur.fetchall())
    want = sorted((r["span_id"], r["duration"]) for r in sdb.ing.expected(pids))
    assert got == want and len(got) == 80


def test_late_block_is_seen_by_the_next_query(sdb: SpansDB) -> None:
    pids = ingest_processes(sdb, n=1, blocks=1)
    a, b = T0, T0 + dt.timedelta(seconds=60)
    q = "SELECT * FROM otel_spans WHERE process_id = %s AND end_time >= %s AND start_time <= %s"
    assert sdb.spans(q, (pids[0], a, b)) == overlapping(sdb.ing.expected(pids), a, b)
    sdb.ing.add(make_resource_spans(service="svc0", pid=0, n=25, seed=77, base_ns=T0_NS + 10**9))
    got = sdb.spans(q, (pids[0], a, b))
    assert got == overlapping(sdb.ing.expected(pids), a, b)
    assert len(got) > 40


def test_explain_shows_window_partitions_files_and_filters(sdb: SpansDB) -> None:
    pids = ingest_processes(sdb, n=1, blocks=2)
    sql = (
        f"SELECT name FROM otel_spans WHERE process_id = '{pids[0]}'"
        f" AND start_time >= '{T0.isoformat()}' AND name = 'op-1'"
    )
    sdb.rows(sql)  # materialise
    plan = "\n".join(r["QUERY PLAN"] for r in sdb.rows("EXPLAIN (VERBOSE) " + sql))
    assert "Window: [" in plan and "Partitions: 2 (stale: 0" in plan, plan
    assert "Files: 2" in plan and "Row groups:" in plan
    assert "name = 'op-1'" in plan


def test_columns_of_the_table_match_arrow_names() -> None:
    assert tuple(c.name for c in COLUMNS) == COLUMN_NAMES


def test_eight_sessions_on_a_stale_process_build_each_partition_once(sdb: SpansDB) -> None:
    pids = ingest_processes(sdb, n=1, blocks=3)
    results: list[list[dict]] = []
    failures: list[BaseException] = []
    barrier = threading.Barrier(8)

    def session() -> None:
        try:
            with psycopg.connect(sdb.dsn, autocommit=True, row_factory=dict_row) as c:
                barrier.wait()
                rows = c.execute("SELECT * FROM otel_spans WHERE process_id = %s", (pids[0],))
                results.append(sorted(rows.fetchall(), key=row_key))
        except BaseException as e:  # reported below
            failures.append(e)

    threads = [threading.Thread(target=session) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    want = sdb.ing.expected(pids)
    assert len(results) == 8 and all(r == want for r in results)
    parts = sdb.rows("SELECT generation FROM otel_partitions")
    assert len(parts) == 3 and all(p["generation"] == 1 for p in parts)
    assert sdb.rows("SELECT count(*) AS n FROM otel_partition_files") == [{"n": 3}]


def test_backend_killed_during_refresh_leaves_no_partial_partition(
    sdb: SpansDB, pg: LocalCluster
) -> None:
    pids = ingest_processes(sdb, n=1, blocks=1)
    with psycopg.connect(sdb.dsn, autocommit=True) as c:
        ensure_schema(c)
        # The dev cluster runs with synchronous_commit=off: make the setup survive the crash.
        c.execute("CHECKPOINT")
    blocker = psycopg.connect(sdb.dsn)
    blocker.execute("LOCK TABLE otel_partitions IN EXCLUSIVE MODE")  # reads pass, writes wait
    victim = psycopg.connect(sdb.dsn, autocommit=True)
    victim_pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]

    def scan() -> None:
        try:
            victim.execute("SELECT * FROM otel_spans WHERE process_id = %s", (pids[0],))
        except psycopg.Error:
            pass  # killed

    t = threading.Thread(target=scan)
    t.start()
    deadline = time.monotonic() + 60
    waiting = []
    while time.monotonic() < deadline and not waiting:
        waiting = sdb.rows(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE 'INSERT INTO otel_partitions%%'"
        )
        time.sleep(0.05)
    assert waiting, "the refresh never reached its index update"
    written = sdb.store.list("views/")
    assert len(written) == 1, "the Parquet file is written before the index transaction"
    os.kill(victim_pid, signal.SIGKILL)
    t.join(30)
    for c in (victim, blocker, sdb.conn):
        c.close()
    time.sleep(0.5)
    pg.wait_ready(60)
    deadline = time.monotonic() + 60
    while True:
        try:
            sdb.conn = psycopg.connect(sdb.dsn, autocommit=True, row_factory=dict_row)
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert sdb.rows("SELECT count(*) AS n FROM otel_partitions") == [{"n": 0}]
    assert sdb.rows("SELECT count(*) AS n FROM otel_partition_files") == [{"n": 0}]
    got = sdb.spans("SELECT * FROM otel_spans WHERE process_id = %s", (pids[0],))
    assert got == sdb.ing.expected(pids) and len(got) == 40
    with psycopg.connect(sdb.dsn, autocommit=True) as c:
        assert refresh.collect_garbage(c, sdb.store, grace_seconds=0, orphans=True) == 1
    assert sdb.store.list("views/") != written and len(sdb.store.list("views/")) == 1
