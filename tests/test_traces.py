"""Issue 6 end to end: a real receiver, real PostgreSQL, the extension's SQL and the CLI.

A known trace across six services (tests/trace_helpers.py) is sent as raw OTLP in three
requests (late spans in the third) with orphans; trace lookups, window queries, their limits,
the trace functions and the waterfall are checked against expectations computed from the sent
messages and the specs.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.rows import dict_row
from spans_helpers import row_key
from trace_helpers import (
    ALL_SPECS,
    BASE_NS,
    MS,
    OLD_NS,
    T1,
    T2,
    T3,
    T4,
    expected_from_sent,
    ns_dt,
    send_all,
    service_map,
)

from otelspans_fdw.devcluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent


class TraceDB:
    """A database with the extension, a receiver that got the known traffic, and expectations."""

    def __init__(self, dsn: str, store: Path, receiver: Any):
        self.dsn, self.store = dsn, store
        self.conn = psycopg.connect(dsn, autocommit=True, row_factory=dict_row)
        self.conn.execute("CREATE EXTENSION IF NOT EXISTS otelspans")
        self.conn.execute(f"ALTER SERVER otel_spans_server OPTIONS (ADD store '{store}')")
        sent = send_all(receiver.http_url)
        self.expected = expected_from_sent(dsn, store, sent)

    def rows(self, sql: str, params: object = None, **kw: object) -> list[dict]:
        return self.conn.execute(sql, params, **kw).fetchall()  # type: ignore[arg-type]

    def spans(self, sql: str, params: object = None, **kw: object) -> list[dict]:
        return sorted(self.rows(sql, params, **kw), key=row_key)

    def want(self, *trace_ids: str) -> list[dict]:
        return [r for r in self.expected if r["trace_id"] in trace_ids]

    def plan(self, sql: str, params: object = None) -> str:
        return "\n".join(r["QUERY PLAN"] for r in self.rows("EXPLAIN " + sql, params))


@pytest.fixture
def tdb(fresh_dsn: str, pg: LocalCluster, receiver_factory: Any) -> Iterator[TraceDB]:
    store = pg.base / f"store-{uuid.uuid4().hex[:8]}"
    store.mkdir()
    os.chmod(store, 0o777)  # the receiver (this user) and the backend (postgres) share it
    t = TraceDB(fresh_dsn, store, receiver_factory(store=store))
    yield t
    t.conn.close()
    shutil.rmtree(store, ignore_errors=True)


def test_trace_lookup_returns_exactly_the_trace_across_processes(tdb: TraceDB) -> None:
    want = tdb.want(T1)
    assert len(want) == 16 and len({r["process_id"] for r in want}) == 6
    assert {r["service_name"] for r in want} == {
        "frontend",
        "checkout",
        "cart",
        "payment",
        "inventory",
        "shipping",
    }
    assert tdb.spans("SELECT * FROM otel_spans WHERE trace_id = %s", (T1,)) == want
    # Only the partitions holding T3's blocks were materialised by a T3 lookup: T1's lookup
    # above built six (process, hour) partitions; T3 lives in one of them (cart).
    assert tdb.rows("SELECT count(*) AS n FROM otel_partitions") == [{"n": 6}]
    plan = tdb.plan(f"SELECT * FROM otel_spans WHERE trace_id = '{T3}'")
    assert "Found by: trace (trace index: 1 blocks)" in plan and "Partitions: 1 " in plan, plan
    # Prepared, generic plan: the trace id arrives as a parameter.
    tdb.conn.execute("SET plan_cache_mode = force_generic_plan")
    for tid in (T2, T3, T1):
        got = tdb.spans("SELECT * FROM otel_spans WHERE trace_id = %s", (tid,), prepare=True)
        assert got == tdb.want(tid), tid
    assert tdb.rows("SELECT * FROM otel_spans WHERE trace_id = %s", ("f" * 32,)) == []
    assert tdb.rows("SELECT * FROM otel_spans WHERE trace_id = 'not-a-trace'") == []


def test_trace_in_list_and_join_on_trace_id(tdb: TraceDB) -> None:
    got = tdb.spans(f"SELECT * FROM otel_spans WHERE trace_id IN ('{T2}', '{T3}', '{'e' * 32}')")
    assert got == tdb.want(T2, T3) and len(got) == 3
    got = tdb.spans("SELECT * FROM otel_spans WHERE trace_id = ANY(%s)", ([T1, T4],))
    assert got == tdb.want(T1, T4) and len(got) == 17
    tdb.conn.execute("CREATE TABLE wanted (trace_id text, why text)")
    tdb.conn.execute(f"INSERT INTO wanted VALUES ('{T1}', 'slow'), ('{T3}', 'odd')")
    sql = "SELECT s.*, w.why FROM wanted w JOIN otel_spans s ON s.trace_id = w.trace_id"
    plan = tdb.plan(sql)
    assert "Nested Loop" in plan and "Foreign Scan on otel_spans" in plan, plan
    got = tdb.rows(sql)
    assert sorted(({k: v for k, v in r.items() if k != "why"} for r in got), key=row_key) == (
        tdb.want(T1, T3)
    )
    assert {r["why"] for r in got if r["trace_id"] == T3} == {"odd"}


def test_service_name_column_is_pushed_down(tdb: TraceDB) -> None:
    got = tdb.spans(
        "SELECT * FROM otel_spans WHERE trace_id = %s AND service_name = 'shipping'", (T1,)
    )
    assert got == [r for r in tdb.want(T1) if r["service_name"] == "shipping"] and len(got) == 4
    plan = tdb.plan(f"SELECT * FROM otel_spans WHERE trace_id = '{T1}' AND service_name = 'cart'")
    assert "service_name = 'cart'" in plan, plan


def test_time_window_without_process_matches_independent_rows(tdb: TraceDB) -> None:
    recent = [r for r in tdb.expected if r["trace_id"] != T4]
    got = tdb.spans("SELECT * FROM otel_spans WHERE start_time >= now() - interval '1 hour'")
    assert got == recent and len(got) == 19
    a, b = ns_dt(BASE_NS + 25 * MS), ns_dt(BASE_NS + 61 * MS)
    got = tdb.spans("SELECT * FROM otel_spans WHERE start_time BETWEEN %s AND %s", (a, b))
    want = [r for r in tdb.expected if a <= r["start_time"] <= b]
    assert got == want and {r["name"] for r in got} == {"charge", "fraud check", "reserve"}
    since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    plan = tdb.plan("SELECT * FROM otel_spans WHERE start_time >= %s", (since,))
    assert "Found by: window" in plan and "Processes: 6 " in plan, plan
    old = tdb.spans(
        "SELECT * FROM otel_spans WHERE start_time >= %s AND start_time < %s",
        (ns_dt(OLD_NS) - dt.timedelta(hours=1), ns_dt(OLD_NS) + dt.timedelta(hours=1)),
    )
    assert old == tdb.want(T4) and len(old) == 1


def test_window_bounds_give_an_error_with_a_hint(tdb: TraceDB) -> None:
    # The guard counts work: 20 spans to materialise is more than a limit of 5...
    tdb.conn.execute("ALTER SERVER otel_spans_server OPTIONS (ADD max_stale_spans '5')")
    with pytest.raises(errors.InvalidParameterValue) as e:
        tdb.rows("SELECT * FROM otel_spans WHERE start_time >= now() - interval '3 days'")
    assert "would materialise 20 spans first" in e.value.diag.message_primary
    assert "more than max_stale_spans (5)" in e.value.diag.message_primary
    hint = e.value.diag.message_hint or ""
    assert "process_id" in hint and "narrower windows" in hint and "max_stale_spans" in hint
    assert "otelspans materialise" in hint
    # ...and once narrower queries have materialised it, the wide one only reads.
    for pid in {r["process_id"] for r in tdb.expected}:
        tdb.rows("SELECT count(*) FROM otel_spans WHERE process_id = %s", (pid,))
    got = tdb.spans("SELECT * FROM otel_spans WHERE start_time >= now() - interval '3 days'")
    assert got == tdb.expected and len(got) == 20
    # A width limit is there for whoever wants one.
    tdb.conn.execute("ALTER SERVER otel_spans_server OPTIONS (ADD max_window '1 day')")
    with pytest.raises(errors.InvalidParameterValue) as e:
        tdb.rows("SELECT * FROM otel_spans WHERE start_time >= now() - interval '3 days'")
    assert "max_window (1 day)" in e.value.diag.message_primary
    tdb.conn.execute("ALTER SERVER otel_spans_server OPTIONS (DROP max_window)")
    tdb.conn.execute("ALTER SERVER otel_spans_server OPTIONS (ADD max_processes '5')")
    with pytest.raises(errors.InvalidParameterValue) as e:
        tdb.rows("SELECT * FROM otel_spans WHERE start_time >= now() - interval '1 hour'")
    assert "more than max_processes (5)" in e.value.diag.message_primary
    assert "max_processes" in (e.value.diag.message_hint or "")
    # Exactly at the limit is allowed: six processes have spans in the last hour.
    tdb.conn.execute("ALTER SERVER otel_spans_server OPTIONS (SET max_processes '6')")
    got = tdb.rows(
        "SELECT count(*) AS n FROM otel_spans WHERE start_time >= now() - '1 hour'::interval"
    )
    assert got == [{"n": 19}]


def test_no_usable_qual_is_an_error_naming_the_three_ways(tdb: TraceDB) -> None:
    for sql in (
        "SELECT * FROM otel_spans WHERE name = 'charge'",
        "SELECT * FROM otel_spans WHERE start_time <= now()",  # no lower bound: not bounded
        "SELECT count(*) FROM otel_spans",
    ):
        with pytest.raises(errors.InvalidParameterValue) as e:
            tdb.rows(sql)
        msg = e.value.diag.message_primary
        assert "process_id" in msg and "trace_id" in msg and "time window" in msg, sql
        hint = e.value.diag.message_hint or ""
        assert "process_id = '<uuid>'" in hint and "JOIN otel_spans" in hint
        assert "trace_id = '<32 hex digits>'" in hint and "start_time >= now()" in hint


# Tree order of T1: (depth, orphan, service, name, status, path as span ids).
T1_TREE = [
    (0, False, "frontend", "GET /checkout", "UNSET", [1]),
    (1, False, "frontend", "render cart", "UNSET", [1, 2]),
    (1, False, "frontend", "POST /checkout", "UNSET", [1, 3]),
    (2, False, "checkout", "POST /checkout", "UNSET", [1, 3, 4]),
    (3, False, "checkout", "GET /cart", "UNSET", [1, 3, 4, 5]),
    (4, False, "cart", "GET /cart", "UNSET", [1, 3, 4, 5, 6]),
    (3, False, "checkout", "charge", "UNSET", [1, 3, 4, 7]),
    (4, False, "payment", "charge", "ERROR", [1, 3, 4, 7, 8]),
    (3, False, "checkout", "reserve", "UNSET", [1, 3, 4, 9]),
    (4, False, "inventory", "reserve", "UNSET", [1, 3, 4, 9, 10]),
    (3, False, "checkout", "ship", "UNSET", [1, 3, 4, 11]),
    (4, False, "shipping", "ship", "UNSET", [1, 3, 4, 11, 12]),
    (5, False, "shipping", "label", "UNSET", [1, 3, 4, 11, 12, 16]),
    (0, True, "payment", "fraud check", "ERROR", [14]),
    (0, True, "shipping", "quote carrier", "UNSET", [13]),
    (1, False, "shipping", "db query", "UNSET", [13, 15]),
]


def _sid(n: int) -> str:
    return n.to_bytes(8, "big").hex()


def test_otel_trace_tree_order_depth_path_and_orphans(tdb: TraceDB) -> None:
    rows = tdb.rows("SELECT * FROM otel_trace(%s)", (T1.upper(),))
    got = [
        (r["depth"], r["orphan"], r["service_name"], r["name"], r["status"], r["path"])
        for r in rows
    ]
    assert got == [(d, o, s, n, st, [_sid(i) for i in p]) for d, o, s, n, st, p in T1_TREE]
    by_sid = {r["span_id"]: r for r in tdb.want(T1)}
    for r in rows:  # every other column is the span's own
        e = by_sid[r["span_id"]]
        for k in ("parent_span_id", "process_id", "exe", "kind", "status_message", "start_time"):
            assert r[k] == e[k], k
        assert r["duration"] == e["duration"] and r["end_time"] == e["end_time"]
    assert tdb.rows("SELECT * FROM otel_trace(%s)", ("0" * 32,)) == []


def test_otel_service_map_on_the_known_traces(tdb: TraceDB) -> None:
    begin, end = BASE_NS - 10**9, BASE_NS + 10**9
    got = [
        tuple(r.values())
        for r in tdb.rows("SELECT * FROM otel_service_map(%s, %s)", (ns_dt(begin), ns_dt(end)))
    ]
    want = service_map(begin, end)
    assert [g[:4] for g in got] == [w[:4] for w in want]
    assert [g[:4] for g in got] == [
        ("checkout", "cart", 1, 0),
        ("checkout", "inventory", 1, 0),
        ("checkout", "payment", 1, 1),
        ("checkout", "shipping", 1, 0),
        ("frontend", "checkout", 2, 0),
    ]
    for g, w in zip(got, want, strict=True):
        assert g[4:] == pytest.approx(w[4:], rel=1e-9, abs=1e-9)
    # A window that holds only the late inventory call's child start.
    got = tdb.rows(
        "SELECT caller, callee, calls FROM otel_service_map(%s, %s)",
        (ns_dt(BASE_NS + 61 * MS), ns_dt(BASE_NS + 61 * MS)),
    )
    assert [tuple(r.values()) for r in got] == [("checkout", "inventory", 1)]


WATERFALL_T1 = f"""\
trace {T1}: 16 spans, 6 services, 2 errors, 100.00 ms
service     span                    offset    duration
frontend    GET /checkout          0.00 ms   100.00 ms
frontend      render cart          1.00 ms     5.00 ms
frontend      POST /checkout      10.00 ms    80.00 ms
checkout        POST /checkout    11.00 ms    78.00 ms
checkout          GET /cart       12.00 ms    10.00 ms
cart                GET /cart     13.00 ms     8.00 ms
checkout          charge          25.00 ms    30.00 ms
payment   !         charge        26.00 ms    28.00 ms
checkout          reserve         60.00 ms    10.00 ms
inventory           reserve       61.00 ms     8.00 ms
checkout          ship            72.00 ms    16.00 ms
shipping            ship          73.00 ms    14.00 ms
shipping              label       81.00 ms     0.00 ms
payment   !?fraud check           30.00 ms     5.00 ms
shipping   ?quote carrier         74.00 ms     6.00 ms
shipping      db query            75.00 ms     2.00 ms
! error   ? orphan (its parent span never arrived)
"""


def test_cli_trace_prints_the_waterfall(tdb: TraceDB, pg: LocalCluster) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "otelspans_fdw.cli",
            "trace",
            T1,
            "--dsn",
            tdb.dsn,
            "--width",
            "100",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    lines = out.splitlines()
    # Text columns exactly; bars structurally (below).
    assert "\n".join(ln.split("  |")[0].rstrip() for ln in lines) + "\n" == WATERFALL_T1
    bars = [ln.split("  |", 1)[1] for ln in lines[2:-1]]
    width = len(lines[1].split("  |", 1)[1]) - 1  # header: |----|
    assert lines[1].endswith("|" + "-" * width + "|")
    specs = {s.name + s.service: s for s in ALL_SPECS if s.trace == T1}
    for line, bar in zip(lines[2:-1], bars, strict=True):
        assert len(bar) == width + 1 and bar.endswith("|")
        cells = bar[:-1]
        first = len(cells) - len(cells.lstrip(" "))
        drawn = cells.strip(" ")
        svc, name = line.split()[0], line[12:].strip().split("  ")[0]
        s = specs[name + svc]
        assert first == min(int(s.start_ms * width / 100), width - 1), line
        if s.dur_ms:
            assert set(drawn) == {"█"} and len(drawn) == max(1, round(s.dur_ms * width / 100))
        else:
            assert drawn == "▏"
    missing = subprocess.run(
        [sys.executable, "-m", "otelspans_fdw.cli", "trace", "ab" * 16, "--dsn", tdb.dsn],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert missing.returncode == 1 and missing.stdout == f"trace {'ab' * 16}: no spans\n"
    no_ext = subprocess.run(
        [sys.executable, "-m", "otelspans_fdw.cli", "trace", T1, "--dsn", pg.dsn()],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert no_ext.returncode == 2 and "otel_trace() is not installed" in no_ext.stderr
    assert "hint: Run CREATE EXTENSION otelspans" in no_ext.stderr


def test_sdk_exported_trace_across_five_services(
    fresh_dsn: str, pg: LocalCluster, receiver_factory: Any
) -> None:
    """OpenTelemetry SDK exporters (OTLP/HTTP), W3C context propagated between 5 services."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    store = pg.base / f"store-{uuid.uuid4().hex[:8]}"
    store.mkdir()
    os.chmod(store, 0o777)
    rcv = receiver_factory(store=store)
    conn = psycopg.connect(fresh_dsn, autocommit=True, row_factory=dict_row)
    conn.execute("CREATE EXTENSION IF NOT EXISTS otelspans")
    conn.execute(f"ALTER SERVER otel_spans_server OPTIONS (ADD store '{store}')")
    memory = InMemorySpanExporter()
    providers = []
    for i, svc in enumerate(["edge", "api", "orders", "stock", "db-proxy"]):
        tp = TracerProvider(resource=Resource.create({"service.name": svc, "process.pid": i}))
        tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=rcv.http_url)))
        tp.add_span_processor(SimpleSpanProcessor(memory))
        providers.append(tp)
    prop = TraceContextTextMapPropagator()

    def call(level: int, carrier: dict[str, str]) -> None:
        tracer = providers[level].get_tracer("sdk-test")
        ctx = prop.extract(carrier)
        with tracer.start_as_current_span(f"handle-{level}", context=ctx) as span:
            with tracer.start_as_current_span(f"work-{level}"):
                pass
            if level + 1 < len(providers):
                out: dict[str, str] = {}
                prop.inject(out, context=set_span_in_context(span))
                call(level + 1, out)

    call(0, {})
    for tp in providers:
        tp.shutdown()  # flushes the batch exporters
    sent = memory.get_finished_spans()
    tid = f"{sent[0].context.trace_id:032x}"
    want = {
        (
            f"{s.context.span_id:016x}",
            f"{s.parent.span_id:016x}" if s.parent else None,
            s.name,
            s.resource.attributes["service.name"],
        )
        for s in sent
    }
    assert len(want) == 10 and len({w[3] for w in want}) == 5
    got = conn.execute(
        "SELECT span_id, parent_span_id, name, service_name FROM otel_spans WHERE trace_id = %s",
        (tid,),
    ).fetchall()
    assert {tuple(r.values()) for r in got} == want and len(got) == 10
    tree = conn.execute("SELECT depth, name, orphan FROM otel_trace(%s)", (tid,)).fetchall()
    # handle-N is the child of handle-(N-1) (the propagated context); work-N of handle-N,
    # and it starts before handle-(N+1): tree order interleaves them.
    want_tree = [(0, "handle-0", False)]
    for lvl in range(5):
        want_tree.append((lvl + 1, f"work-{lvl}", False))
        if lvl < 4:
            want_tree.append((lvl + 1, f"handle-{lvl + 1}", False))
    assert [(r["depth"], r["name"], r["orphan"]) for r in tree] == want_tree
    conn.close()
