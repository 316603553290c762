"""Grouping, aggregates and top-N pushed to the otel_spans wrapper, checked against PostgreSQL.

Every query runs twice on the same spans: on ``otel_spans`` (where the host pushes it down,
which EXPLAIN must show) and on a native heap copy made with ``CREATE TABLE ... AS SELECT *``
(where PostgreSQL computes it).  Results and result types must be identical.  Forms that must
not be pushed are checked to run as PostgreSQL's own Aggregate / Limit over the scan, with the
same answers.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.rows import tuple_row
from spans_helpers import T0_NS, make_resource_spans
from test_otel_spans_sql import HOUR_A, SpansDB

from otelspans_fdw.devcluster import LocalCluster
from otelspans_fdw.lake.aggregate import pg_numeric_avg


@pytest.fixture(scope="module")
def agg_db(pg: LocalCluster) -> Iterator[tuple[SpansDB, list[uuid.UUID]]]:
    """Five processes of spans (one without service_name rows), and their heap copy."""
    name = "t_agg_" + uuid.uuid4().hex[:8]
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    store_dir = pg.base / f"store-{uuid.uuid4().hex[:8]}"
    store_dir.mkdir()
    os.chmod(store_dir, 0o777)
    s = SpansDB(pg.dsn(name), store_dir)
    pids = []
    for p in range(5):
        for k in range(2):
            bid = s.ing.add(
                make_resource_spans(
                    service=f"svc{p % 3}",
                    pid=p,
                    n=60,
                    seed=p * 10 + k,
                    base_ns=T0_NS + k * 45 * 10**9 + p * 7 * 10**9,
                    spacing_ns=700_000_000 + p * 10_000_000,
                ),
                insert_time=HOUR_A + dt.timedelta(hours=k),
            )
        pids.append(s.pid_of(bid))
    # spans of decades: their durations sum beyond 2**63 (sum(bigint) is numeric)
    bid = s.ing.add(
        make_resource_spans(service="svc-long", pid=9, n=8, seed=99, spacing_ns=6 * 10**17),
        insert_time=HOUR_A,
    )
    pids.append(s.pid_of(bid))
    s.conn.execute(
        "CREATE TABLE heap AS SELECT * FROM otel_spans WHERE process_id = ANY(%s)", (pids,)
    )
    s.conn.execute("ANALYZE heap")
    try:
        yield s, pids
    finally:
        s.conn.close()
        with psycopg.connect(pg.dsn(), autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(store_dir, ignore_errors=True)


def _run(s: SpansDB, sql: str, params: Any) -> tuple[list[tuple[Any, ...]], list[str]]:
    with s.conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(sql, params)
        rows = list(cur.fetchall())
        assert cur.description is not None
        types = [
            s.conn.execute("SELECT format_type(%s, NULL) AS t", (d.type_code,)).fetchone()["t"]
            for d in cur.description
        ]
    return rows, types


def _explain(s: SpansDB, sql: str, params: Any) -> str:
    rows = s.rows("EXPLAIN (VERBOSE) " + sql, params)
    return "\n".join(r["QUERY PLAN"] for r in rows)


def _sortable(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((v is None, str(type(v)), v if v is not None else 0) for v in row)


def check(
    s: SpansDB,
    pids: list[uuid.UUID],
    sql: str,
    *,
    pushed: str | None = "Pushed Aggregates",
    ordered: bool = False,
    extra: tuple[Any, ...] = (),
) -> list[tuple[Any, ...]]:
    """Same rows and types on otel_spans and on the heap; EXPLAIN shows ``pushed`` (or not)."""
    params = (pids, *extra)
    got, got_types = _run(s, sql.format(T="otel_spans"), params)
    want, want_types = _run(s, sql.format(T="heap"), params)
    assert got_types == want_types, sql
    if not ordered:
        got, want = sorted(got, key=_sortable), sorted(want, key=_sortable)
    assert got == want, sql
    plan = _explain(s, sql.format(T="otel_spans"), params)
    if pushed is None:
        assert "Pushed Aggregates" not in plan and "Pushed Limit" not in plan, plan
    else:
        assert pushed in plan, plan
    return got


W = "WHERE process_id = ANY(%s)"


@pytest.mark.parametrize(
    "sql",
    [
        # grouping on columns, the common aggregates, exact types
        f"SELECT service_name, count(*), count(parent_span_id), sum(duration), avg(duration),"
        f" min(duration), max(duration), min(start_time), max(end_time) FROM {{T}} {W}"
        " GROUP BY service_name",
        f"SELECT name, kind, status, count(*) FROM {{T}} {W} GROUP BY name, kind, status",
        f"SELECT process_id, count(*), avg(duration) FROM {{T}} {W} GROUP BY 1",
        f"SELECT status_message, count(*) FROM {{T}} {W} GROUP BY 1",  # NULL group
        f"SELECT parent_span_id IS NULL, count(*) FROM {{T}} {W} GROUP BY service_name,"
        " parent_span_id IS NULL",
        # no GROUP BY: one row
        f"SELECT count(*), sum(duration), avg(duration), min(name), max(name) FROM {{T}} {W}",
        # empty input: one row of count 0 and NULLs / no groups
        f"SELECT count(*), sum(duration), avg(duration), max(start_time) FROM {{T}} {W}"
        " AND duration < 0",
        f"SELECT service_name, count(*) FROM {{T}} {W} AND duration < 0 GROUP BY 1",
        # time buckets
        f"SELECT date_trunc('minute', start_time) AS m, count(*), avg(duration) FROM {{T}} {W}"
        " GROUP BY 1",
        f"SELECT date_trunc('second', end_time), date_trunc('hour', start_time), count(*)"
        f" FROM {{T}} {W} GROUP BY 1, 2",
        f"SELECT date_trunc('day', start_time), date_trunc('week', start_time),"
        f" date_trunc('month', start_time), count(*) FROM {{T}} {W} GROUP BY 1, 2, 3",
        f"SELECT date_bin('15 seconds', start_time, '2001-01-01'), count(*) FROM {{T}} {W}"
        " GROUP BY 1",
        f"SELECT date_bin('7 seconds', start_time, '2030-01-01 00:00:03+00'), max(duration)"
        f" FROM {{T}} {W} GROUP BY 1",
        # expressions over aggregates stay with PostgreSQL, the aggregates are pushed
        f"SELECT service_name, count(*) * 2, avg(duration) / 1e6, sum(duration) - min(duration)"
        f" FROM {{T}} {W} GROUP BY service_name",
        # conditions on the scan: windows, text, IS NULL, IN lists, parameters
        f"SELECT service_name, count(*) FROM {{T}} {W} AND start_time >= %s::timestamptz"
        " AND name IN ('op-1', 'op-2') AND parent_span_id IS NOT NULL GROUP BY 1",
        f"SELECT kind, count(*) FROM {{T}} {W} AND status <> 'ERROR' AND duration > 1000"
        " AND status_message IS NULL GROUP BY 1",
        # distinct, percentiles, bool_or / bool_and, FILTER
        f"SELECT service_name, count(DISTINCT name), count(DISTINCT trace_id),"
        f" count(DISTINCT status_message) FROM {{T}} {W} GROUP BY 1",
        f"SELECT service_name, percentile_cont(0.95) WITHIN GROUP (ORDER BY duration),"
        f" percentile_cont(0.5) WITHIN GROUP (ORDER BY duration),"
        f" percentile_disc(0.9) WITHIN GROUP (ORDER BY duration),"
        f" percentile_disc(0.5) WITHIN GROUP (ORDER BY start_time) FROM {{T}} {W} GROUP BY 1",
        f"SELECT name, percentile_cont(ARRAY[0, 0.25, 0.5, 0.99, 1]) WITHIN GROUP"
        f" (ORDER BY duration), percentile_disc(ARRAY[0.1, 0.9]) WITHIN GROUP (ORDER BY duration)"
        f" FROM {{T}} {W} GROUP BY 1",
        # many small groups: one sort of all values instead of a selection per group
        f"SELECT trace_id, percentile_cont(0.5) WITHIN GROUP (ORDER BY duration),"
        f" percentile_disc(ARRAY[0.5, 1]) WITHIN GROUP (ORDER BY duration),"
        f" percentile_disc(0.3) WITHIN GROUP (ORDER BY end_time) FROM {{T}} {W} GROUP BY 1",
        f"SELECT date_trunc('second', start_time), percentile_cont(ARRAY[0.1, 0.75])"
        f" WITHIN GROUP (ORDER BY duration) FROM {{T}} {W} GROUP BY 1",
        f"SELECT service_name, bool_or(status = 'ERROR'), bool_and(duration > 0),"
        f" bool_or(status_message IS NOT NULL AND kind IN ('SERVER', 'CLIENT')),"
        f" bool_and(NOT (name = 'op-1' OR name = 'op-2')) FROM {{T}} {W} GROUP BY 1",
        f"SELECT service_name, count(*) FILTER (WHERE status = 'ERROR'),"
        f" count(status_message) FILTER (WHERE duration > 1000000),"
        f" sum(duration) FILTER (WHERE kind = 'SERVER'), avg(duration) FILTER (WHERE false),"
        f" percentile_cont(0.5) WITHIN GROUP (ORDER BY duration) FILTER (WHERE status = 'OK'),"
        f" max(start_time) FILTER (WHERE name <> 'op-0') FROM {{T}} {W} GROUP BY 1",
        f"SELECT count(*) FILTER (WHERE status = 'ERROR')::float8 / count(*) FROM {{T}} {W}"
        " AND start_time >= %s::timestamptz - interval '1 day'",
        # grouping without aggregates
        f"SELECT kind FROM {{T}} {W} GROUP BY kind",
    ],
)
def test_pushed_grouping_matches_postgres(
    agg_db: tuple[SpansDB, list[uuid.UUID]], sql: str
) -> None:
    s, pids = agg_db
    extra: tuple[Any, ...] = ()
    if "%s::timestamptz" in sql:
        extra = (dt.datetime(2000, 1, 1, tzinfo=dt.UTC),)
    pushed = (
        "Pushed Aggregates"
        if "count" in sql or "sum" in sql or "max" in sql or ("percentile" in sql or "bool_" in sql)
        else "Pushed Grouping"
    )
    rows = check(s, pids, sql, pushed=pushed, extra=extra)
    assert rows or "duration < 0" in sql


def test_having_stays_with_postgres_on_pushed_groups(
    agg_db: tuple[SpansDB, list[uuid.UUID]],
) -> None:
    s, pids = agg_db
    sql = (
        f"SELECT name, count(*) FROM {{T}} {W} GROUP BY name"
        " HAVING count(*) > 101 AND avg(duration) > 1000"
    )
    rows = check(s, pids, sql)
    assert 0 < len(rows) < 6
    plan = _explain(s, sql.format(T="otel_spans"), (pids,))
    assert "Filter:" in plan


@pytest.mark.parametrize(
    "sql",
    [
        # top-N over rows
        f"SELECT span_id, duration FROM {{T}} {W} ORDER BY duration DESC, span_id LIMIT 10",
        f"SELECT span_id, name, duration / 1e6 AS ms FROM {{T}} {W} AND status = 'ERROR'"
        " ORDER BY duration DESC, span_id LIMIT 5",
        f"SELECT span_id, start_time FROM {{T}} {W} ORDER BY start_time, span_id LIMIT 7 OFFSET 3",
        f"SELECT span_id, status_message FROM {{T}} {W} ORDER BY status_message NULLS FIRST,"
        " span_id LIMIT 12",
        f"SELECT span_id, status_message FROM {{T}} {W} ORDER BY status_message DESC NULLS LAST,"
        " span_id DESC LIMIT 12",
        f"SELECT * FROM {{T}} {W} ORDER BY duration DESC, span_id LIMIT 3",
        # top-N over groups
        f"SELECT name, count(*) FILTER (WHERE status = 'ERROR') AS errors FROM {{T}} {W}"
        " GROUP BY name ORDER BY errors DESC, name LIMIT 3",
        f"SELECT service_name, avg(duration) FROM {{T}} {W} GROUP BY 1 ORDER BY 2 DESC LIMIT 2",
        f"SELECT service_name, sum(duration) FROM {{T}} {W} GROUP BY 1 ORDER BY 2 LIMIT 2",
        f"SELECT date_trunc('minute', start_time), count(*) FROM {{T}} {W} GROUP BY 1"
        " ORDER BY 1 DESC LIMIT 2",
        f"SELECT status_message, count(*) FROM {{T}} {W} GROUP BY 1 ORDER BY 1 NULLS FIRST LIMIT 2",
    ],
)
def test_pushed_top_n_matches_postgres(agg_db: tuple[SpansDB, list[uuid.UUID]], sql: str) -> None:
    s, pids = agg_db
    rows = check(s, pids, sql, pushed="Pushed Limit", ordered=True)
    assert rows


@pytest.mark.parametrize(
    "sql",
    [
        # aggregates and keys we do not compute
        # (in a stated order: without one the text depends on the plan's row order)
        f"SELECT service_name, string_agg(name, ',' ORDER BY name, span_id) FROM {{T}} {W}"
        " GROUP BY 1",
        f"SELECT service_name, array_agg(duration ORDER BY duration) FROM {{T}} {W} GROUP BY 1",
        f"SELECT service_name, sum(DISTINCT duration) FROM {{T}} {W} GROUP BY 1",
        f"SELECT upper(service_name), count(*) FROM {{T}} {W} GROUP BY 1",
        f"SELECT properties->>'http.route', count(*) FROM {{T}} {W} GROUP BY 1",
        f"SELECT date_trunc('decade', start_time), count(*) FROM {{T}} {W} GROUP BY 1",
        f"SELECT avg(duration / 1000) FROM {{T}} {W}",
        f"SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY duration DESC) FROM {{T}} {W}",
        f"SELECT count(*) FILTER (WHERE name LIKE 'op%%') FROM {{T}} {W}",
        # a condition that cannot be applied exactly: nothing is pushed
        f"SELECT count(*) FROM {{T}} {W} AND name LIKE 'op-%%'",
        f"SELECT count(*) FROM {{T}} {W} AND name > 'op-2'",
        f"SELECT count(*) FROM {{T}} {W} AND length(name) > 4",
        f"SELECT count(*) FROM {{T}} {W} AND start_time > '2000-01-01'::date",
        # grouping sets, text ordering under a collation that is not bytewise
        f"SELECT kind, status, count(*) FROM {{T}} {W} GROUP BY ROLLUP (kind, status)",
        f'SELECT span_id FROM {{T}} {W} ORDER BY name COLLATE "POSIX" DESC, span_id LIMIT 0',
        # a LIMIT above HAVING, DISTINCT, or an ordering on an expression
        f"SELECT name, count(*) FROM {{T}} {W} GROUP BY 1 HAVING count(*) > 1 ORDER BY 2, 1"
        " LIMIT 2",
        f"SELECT DISTINCT kind FROM {{T}} {W} ORDER BY 1 LIMIT 2",
        f"SELECT span_id FROM {{T}} {W} ORDER BY duration / 7, span_id LIMIT 3",
    ],
)
def test_forms_that_are_not_pushed(agg_db: tuple[SpansDB, list[uuid.UUID]], sql: str) -> None:
    s, pids = agg_db
    push = None
    if "HAVING" in sql:
        push = "Pushed Aggregates"  # the grouping is, the LIMIT above HAVING is not
        assert "Pushed Limit" not in _explain(s, sql.format(T="otel_spans"), (pids,))
    if "POSIX" in sql:
        push = "Pushed Limit"  # POSIX is bytewise: pushed (LIMIT 0 keeps it short)
    check(s, pids, sql, pushed=push, ordered="ORDER BY" in sql)


def test_text_order_under_a_linguistic_collation_is_not_pushed(
    agg_db: tuple[SpansDB, list[uuid.UUID]],
) -> None:
    s, pids = agg_db
    coll = s.rows(
        "SELECT collname FROM pg_collation WHERE collname = 'en_US' OR"
        " collname LIKE 'en_US.utf8' OR collprovider = 'i' LIMIT 1"
    )
    name = coll[0]["collname"] if coll else None
    sql = f'SELECT span_id, name FROM {{T}} {W} ORDER BY name COLLATE "{name}", span_id LIMIT 4'
    if name is None:
        # no linguistic collation on this machine: the default one (C.UTF-8) is bytewise
        sql = f"SELECT span_id, name FROM {{T}} {W} ORDER BY name, span_id LIMIT 4"
        check(s, pids, sql, pushed="Pushed Limit", ordered=True)
        return
    check(s, pids, sql, pushed=None, ordered=True)


def _array(pids: list[uuid.UUID]) -> str:
    return "'{" + ",".join(map(str, pids)) + "}'::uuid[]"


def test_prepared_statements_generic_plans_and_null_parameters(
    agg_db: tuple[SpansDB, list[uuid.UUID]],
) -> None:
    s, pids = agg_db
    for status in ("ERROR", "OK"):
        sql = f"SELECT name, count(*), avg(duration) FROM {{T}} {W} AND status = %s GROUP BY 1"
        check(s, pids, sql, extra=(status,))
    s.conn.execute("SET plan_cache_mode = force_generic_plan")
    try:
        for t in ("otel_spans", "heap"):
            s.conn.execute(
                f"PREPARE by_status_{t}(uuid[], text) AS SELECT name, count(*), avg(duration)"
                f" FROM {t} WHERE process_id = ANY($1) AND status = $2 GROUP BY 1"
            )
        plan = "\n".join(
            r["QUERY PLAN"]
            for r in s.rows(f"EXPLAIN EXECUTE by_status_otel_spans({_array(pids)}, 'OK')")
        )
        assert "Pushed Aggregates" in plan and "$2" in plan
        for status in ("'ERROR'", "'OK'", "NULL", "'nope'"):
            got = sorted(
                map(tuple, (r.values() for r in s.rows(
                    f"EXECUTE by_status_otel_spans({_array(pids)}, {status})"))))  # fmt: skip
            want = sorted(
                map(tuple, (r.values() for r in s.rows(
                    f"EXECUTE by_status_heap({_array(pids)}, {status})"))))  # fmt: skip
            assert got == want
            assert bool(got) == (status in ("'ERROR'", "'OK'"))
    finally:
        s.conn.execute("RESET plan_cache_mode")
        s.conn.execute("DEALLOCATE ALL")


def test_numeric_avg_scale_is_postgres_division(agg_db: tuple[SpansDB, list[uuid.UUID]]) -> None:
    s, _ = agg_db
    pairs = [(0, 1), (1, 3), (2, 3), (-7, 2), (10**18, 7), (-(10**19), 3), (5, 10**6),
             (123456789, 10000), (9999, 9999), (10000, 9999), (1, 10**12)]  # fmt: skip
    for total, count in pairs:
        want = s.rows("SELECT (%s::numeric / %s::numeric)::text AS v", (total, count))[0]["v"]
        assert pg_numeric_avg(total, count) == want, (total, count)
        assert Decimal(want) == Decimal(pg_numeric_avg(total, count))


def test_sum_and_avg_beyond_bigint(agg_db: tuple[SpansDB, list[uuid.UUID]]) -> None:
    """sum(bigint) is numeric in PostgreSQL: nothing wraps at 2**63."""
    s, pids = agg_db
    got = check(
        s,
        pids,
        f"SELECT service_name, sum(duration) AS s, avg(duration) AS a,"
        f" sum(duration) FILTER (WHERE false) AS n FROM {{T}} {W} GROUP BY 1",
    )
    long = [r for r in got if r[0] == "svc-long"]
    assert long and long[0][1] > 2**63 and long[0][3] is None


def test_timezone_fixed_offset_and_daylight_saving(
    agg_db: tuple[SpansDB, list[uuid.UUID]],
) -> None:
    s, pids = agg_db
    sql = f"SELECT date_trunc('hour', start_time), count(*) FROM {{T}} {W} GROUP BY 1"
    try:
        s.conn.execute("SET TimeZone = '+05:30'")  # POSIX: fixed, 5:30 west of UTC
        check(s, pids, sql)
        s.conn.execute("SET TimeZone = 'Europe/Paris'")  # daylight saving: not pushed
        check(s, pids, sql, pushed=None)
        # date_bin does not depend on TimeZone
        check(s, pids, f"SELECT date_bin('1 hour', start_time, '2000-01-01'), count(*)"
                       f" FROM {{T}} {W} GROUP BY 1")  # fmt: skip
        s.conn.execute("SET TimeZone = 'UTC'")
        prepared = sql.format(T="otel_spans").replace("%s", "$1")
        s.conn.execute(f"PREPARE byhour(uuid[]) AS {prepared}")
        s.conn.execute("SET plan_cache_mode = force_generic_plan")
        s.conn.execute(f"EXECUTE byhour({_array(pids)})")
        s.conn.execute("SET TimeZone = 'Europe/Paris'")
        with pytest.raises(errors.FeatureNotSupported) as ei:
            s.conn.execute(f"EXECUTE byhour({_array(pids)})")
        assert ei.value.diag.message_hint and "DISCARD PLANS" in ei.value.diag.message_hint
    finally:
        s.conn.execute("RESET TimeZone")
        s.conn.execute("RESET plan_cache_mode")
        s.conn.execute("DEALLOCATE ALL")


def test_a_query_without_process_or_window_is_refused_as_before(
    agg_db: tuple[SpansDB, list[uuid.UUID]],
) -> None:
    s, _ = agg_db
    with pytest.raises(errors.InvalidParameterValue) as ei:
        s.rows("SELECT service_name, count(*) FROM otel_spans GROUP BY 1")
    assert ei.value.diag.message_hint and "process_id" in ei.value.diag.message_hint


def test_cancel_and_statement_timeout_interrupt_a_pushed_aggregate(
    agg_db: tuple[SpansDB, list[uuid.UUID]],
) -> None:
    """A slow wrapper answer (pg_sleep-like busy Python) is interrupted by a cancel."""
    s, pids = agg_db
    sql = (
        "SELECT count(*) FROM otel_spans a WHERE process_id = ANY(%s)"
        " AND duration >= (SELECT 0 FROM pg_sleep(0))"
    )
    # The cancel reaches the backend while it is in the wrapper's scan or aggregation, or
    # between; either way the query ends with query_canceled and the session keeps working.
    s.conn.execute("SET statement_timeout = '1ms'")
    try:
        with pytest.raises(errors.QueryCanceled):
            for _ in range(50):
                s.rows(
                    "SELECT name, percentile_cont(0.5) WITHIN GROUP (ORDER BY duration)"
                    " FROM otel_spans WHERE process_id = ANY(%s) GROUP BY 1",
                    (pids,),
                )
    finally:
        s.conn.execute("RESET statement_timeout")
    conn2 = psycopg.connect(s.dsn, autocommit=True)
    try:
        with conn2.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            pid = cur.fetchone()[0]  # type: ignore[index]

            def cancel() -> None:
                time.sleep(0.05)
                s.conn.execute("SELECT pg_cancel_backend(%s)", (pid,))

            t = threading.Thread(target=cancel)
            t.start()
            with pytest.raises(errors.QueryCanceled):
                cur.execute(
                    "SELECT count(*) FROM generate_series(1, 200) g,"
                    " LATERAL (SELECT count(*) FROM otel_spans WHERE process_id = ANY(%s)"
                    " AND duration > g) x",
                    (pids,),
                )
            t.join()
            cur.execute("SELECT count(*) FROM otel_spans WHERE process_id = ANY(%s)", (pids,))
            assert cur.fetchone()[0] > 0  # type: ignore[index]
    finally:
        conn2.close()
    del sql
