"""The otel_spans wrapper under both hosts: the same rows, the same errors, no crash.

Every query form of the README runs twice over the same metadata and store: on our host
(``public.otel_spans``) and under multicorn2 (``mc.otel_spans``, reached through
``search_path``).  Results are compared with each other and with rows computed independently
from the OTLP messages, so two hosts agreeing on a wrong answer fails too.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from spans_helpers import T0_NS, Ingested, make_resource_spans, ns_to_dt, overlapping, row_key

from otelspans_fdw import db
from otelspans_fdw.devcluster import LocalCluster
from otelspans_fdw.fdw import NO_QUAL_MESSAGE
from otelspans_fdw.objstore import LocalStore
from otelspans_fdw.schema import foreign_table_columns_sql

T0 = ns_to_dt(T0_NS)


def multicorn_otel_spans_sql(store: str) -> str:
    """``mc.otel_spans``: the same table on a multicorn2 server, the same wrapper class."""
    return (
        "CREATE EXTENSION IF NOT EXISTS multicorn;"
        "CREATE SCHEMA mc;"
        "CREATE SERVER mc_spans FOREIGN DATA WRAPPER multicorn"
        f" OPTIONS (wrapper 'otelspans_fdw.fdw.OtelSpansFDW', store '{store}');"
        f"CREATE FOREIGN TABLE mc.otel_spans (\n{foreign_table_columns_sql()}\n) SERVER mc_spans;"
    )


class BothHosts:
    """Two sessions on one database: ``ours`` and ``mc`` (search_path = mc, public)."""

    def __init__(self, dsn: str, store_dir: Path):
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE EXTENSION otelspans")
            c.execute(f"ALTER SERVER otel_spans_server OPTIONS (ADD store '{store_dir}')")
            db.migrate(c)
            c.execute(multicorn_otel_spans_sql(str(store_dir)))
        self.ing = Ingested(dsn, LocalStore(store_dir, durable=False))
        self.dsn = dsn
        self.ours = self._connect()
        self.mc = self._connect("SET search_path = mc, public")

    def _connect(self, setup: str | None = None) -> psycopg.Connection:
        c = psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row)
        if setup:
            c.execute(setup)
        return c

    def reconnect_mc(self) -> None:
        self.mc.close()
        self.mc = self._connect("SET search_path = mc, public")

    def both(self, sql: str, params: Any = None) -> tuple[list[dict], list[dict]]:
        got = []
        for c in (self.ours, self.mc):
            got.append(sorted(c.execute(sql, params).fetchall(), key=_key))
        return got[0], got[1]

    def close(self) -> None:
        self.ours.close()
        self.mc.close()


def _key(r: dict) -> tuple:
    if "span_id" in r and "start_time" in r:
        return row_key(r)
    return tuple(str(v) for v in r.values())


@pytest.fixture
def hosts(fresh_dsn: str, pg: LocalCluster) -> Iterator[BothHosts]:
    store_dir = pg.base / f"store-{uuid.uuid4().hex[:8]}"
    store_dir.mkdir()
    os.chmod(store_dir, 0o777)
    h = BothHosts(fresh_dsn, store_dir)
    yield h
    h.close()


def ingest(h: BothHosts, n: int = 2) -> list[uuid.UUID]:
    pids = []
    for p in range(n):
        for k in range(2):
            bid = h.ing.add(
                make_resource_spans(
                    service=f"svc{p}", pid=p, n=30, seed=p * 10 + k, base_ns=T0_NS + k * 30 * 10**9
                )
            )
        pid = h.ours.execute(
            "SELECT process_id FROM otel_blocks WHERE block_id = %s", (bid,)
        ).fetchone()
        pids.append(pid["process_id"])  # type: ignore[index]
    return pids


def test_process_and_trace_forms_return_the_same_rows(hosts: BothHosts) -> None:
    pids = ingest(hosts)
    want = hosts.ing.expected(pids)
    a, b = pids
    trace = next(r["trace_id"] for r in want if r["process_id"] == a)
    forms: list[tuple[str, Any, list[dict]]] = [
        (f"SELECT * FROM otel_spans WHERE process_id = '{a}'", None, hosts.ing.expected([a])),
        ("SELECT * FROM otel_spans WHERE process_id = %s", (a,), hosts.ing.expected([a])),
        (f"SELECT * FROM otel_spans WHERE process_id IN ('{a}', '{b}')", None, want),
        ("SELECT * FROM otel_spans WHERE process_id = ANY(%s)", ([a, b],), want),
        (
            f"SELECT * FROM otel_spans WHERE trace_id = '{trace}'",
            None,
            [r for r in want if r["trace_id"] == trace],
        ),
        (
            "SELECT * FROM otel_spans WHERE trace_id IN (%s, %s)",
            (trace, "0" * 32),
            [r for r in want if r["trace_id"] == trace],
        ),
    ]
    for sql, params, expected in forms:
        ours, mc = hosts.both(sql, params)
        assert expected, sql
        assert ours == expected, sql
        assert mc == expected, sql


def test_windows_of_every_value_type_return_the_same_rows(hosts: BothHosts) -> None:
    """timestamptz arrives as text under multicorn2, timestamp as a naive datetime without
    microseconds, bigint past int4 as text: the wrapper must read each as our host's value."""
    pids = ingest(hosts)
    want = hosts.ing.expected(pids)
    a = pids[0]
    begin = T0 + dt.timedelta(seconds=10, microseconds=250_000)
    end = T0 + dt.timedelta(seconds=40, microseconds=750_000)
    win = overlapping(want, begin, end)
    exact = [r for r in win if r["start_time"] <= end and r["end_time"] >= begin]
    hosts.ours.execute("SET TimeZone = 'UTC'")
    hosts.mc.execute("SET TimeZone = 'UTC'")
    naive_b = begin.replace(tzinfo=None).isoformat(sep=" ")
    naive_e = end.replace(tzinfo=None).isoformat(sep=" ")
    forms: list[tuple[str, Any, list[dict]]] = [
        (
            "SELECT * FROM otel_spans WHERE end_time >= %s AND start_time <= %s",
            (begin, end),
            exact,
        ),
        (
            f"SELECT * FROM otel_spans WHERE end_time >= '{begin.isoformat()}'"
            f" AND start_time <= '{end.isoformat()}'",
            None,
            exact,
        ),
        (
            f"SELECT * FROM otel_spans WHERE end_time >= '{naive_b}'::timestamp"
            f" AND start_time <= '{naive_e}'::timestamp",
            None,
            exact,
        ),
        (
            "SELECT * FROM otel_spans WHERE process_id = %s AND start_time BETWEEN %s AND %s",
            (a, begin, end),
            [r for r in want if r["process_id"] == a and begin <= r["start_time"] <= end],
        ),
        (
            "SELECT * FROM otel_spans WHERE process_id = %s AND duration < 5000000000",
            (a,),
            [r for r in want if r["process_id"] == a and r["duration"] < 5_000_000_000],
        ),
        (
            "SELECT * FROM otel_spans WHERE process_id = %s AND duration < 1500000000",
            (a,),
            [r for r in want if r["process_id"] == a and r["duration"] < 1_500_000_000],
        ),
    ]
    for sql, params, expected in forms:
        ours, mc = hosts.both(sql, params)
        assert expected, sql
        assert ours == expected, sql
        assert mc == expected, sql
    # With a window the process is not read whole: EXPLAIN names the window under both hosts.
    plans = []
    for c in (hosts.ours, hosts.mc):
        lines = c.execute(
            f"EXPLAIN SELECT * FROM otel_spans WHERE process_id = '{a}'"
            f" AND end_time >= '{begin.isoformat()}' AND start_time <= '{end.isoformat()}'"
        ).fetchall()
        plans.append("\n".join(r["QUERY PLAN"] for r in lines))
    for p in plans:
        assert begin.isoformat() in p and end.isoformat() in p, p


def test_joins_and_functions_return_the_same_rows(hosts: BothHosts) -> None:
    pids = ingest(hosts)
    want = hosts.ing.expected(pids)
    trace = want[0]["trace_id"]
    svc1 = [r for r in want if r["service_name"] == "svc1"]
    ours, mc = hosts.both(
        "SELECT s.* FROM otel_spans s WHERE s.process_id = ANY(ARRAY("
        "SELECT process_id FROM otel_processes WHERE service_name = 'svc1'))"
    )
    assert ours == mc == svc1
    join = (
        "SELECT s.* FROM otel_processes p JOIN otel_spans s USING (process_id)"
        " WHERE p.service_name = 'svc1'"
    )
    assert sorted(hosts.ours.execute(join).fetchall(), key=_key) == svc1
    # Under multicorn2 the wrapper offers no parameterized path on process_id (see below):
    # the join is refused with the HINT, as a scan without a process would be.
    e = _error(hosts.mc, join)
    assert e.diag.message_primary == NO_QUAL_MESSAGE and e.diag.message_hint
    ours, mc = hosts.both(
        "SELECT s.span_id, s.start_time, s.block_id FROM (VALUES (%s)) v(t)"
        " JOIN otel_spans s ON s.trace_id = v.t",
        (trace,),
    )
    assert ours == mc and len(ours) == len([r for r in want if r["trace_id"] == trace])
    ours, mc = hosts.both(
        "SELECT count(*) AS n FROM otel_spans(%s, %s, %s)",
        (pids[0], T0, T0 + dt.timedelta(seconds=20)),
    )
    assert ours == mc and ours[0]["n"] > 0


def test_explain_of_a_join_does_not_crash_multicorn2(hosts: BothHosts) -> None:
    """multicorn2 3.2's EXPLAIN crashes on a Param qual of a by-reference type; the wrapper
    must not offer the path that hands it one, and the query still returns its rows."""
    pids = ingest(hosts)
    trace = hosts.ing.expected([pids[0]])[0]["trace_id"]
    plans = {}
    for sql in (
        "SELECT s.span_id FROM otel_processes p JOIN otel_spans s USING (process_id)"
        " WHERE p.service_name = 'svc0'",
        "SELECT s.span_id FROM (VALUES ('" + trace + "')) v(t) JOIN otel_spans s"
        " ON s.trace_id = v.t",
    ):
        for name, c in (("ours", hosts.ours), ("mc", hosts.mc)):
            plan = "\n".join(r["QUERY PLAN"] for r in c.execute("EXPLAIN (VERBOSE) " + sql))
            assert "Foreign Scan" in plan
            plans[name, sql] = plan
    assert hosts.mc.execute("SELECT 1 AS one").fetchone() == {"one": 1}
    # Our host plans the process join as a parameterized nested loop.
    assert any(
        "Nested Loop" in p and "otel_processes" in p for (n, _), p in plans.items() if n == "ours"
    )


def _error(c: psycopg.Connection, sql: str) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as ei:
        c.execute(sql)
    return ei.value


def test_errors_keep_their_message_and_hint(hosts: BothHosts) -> None:
    ingest(hosts)
    for sql in (
        "SELECT * FROM otel_spans WHERE name = 'x'",
        "SELECT s.* FROM otel_spans s JOIN otel_processes p ON p.exe = s.exe",
    ):
        e_ours, e_mc = _error(hosts.ours, sql), _error(hosts.mc, sql)
        assert e_ours.diag.message_primary == e_mc.diag.message_primary, sql
        assert e_ours.diag.message_hint and e_ours.diag.message_hint == e_mc.diag.message_hint
        assert e_ours.diag.sqlstate == "22023"
        # multicorn2 3.2's log_to_postgres has no SQLSTATE: every ERROR it raises is XX000.
        assert e_mc.diag.sqlstate == "XX000"
