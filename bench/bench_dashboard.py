#!/usr/bin/env python3
"""Dashboard questions: otelspans (pushdown on and off) vs a native heap table vs DuckDB.

One run, one throwaway cluster: ``--spans`` spans of demo traffic from ``--processes``
processes over ``--hours`` hours are ingested and materialised (one cold query), then each
question is timed warm (best of ``--runs``) on

* ``otel_spans`` with the aggregate / top-N pushdown (``otelspans.pushdown_upper`` on),
* ``otel_spans`` with it off (the tree before: every span becomes a tuple),
* a native heap table ``CREATE TABLE ... AS SELECT *`` of the same spans (vacuumed, analysed),
* DuckDB (in this process) over the same Parquet files the partition index lists.

Answers are compared before any time is printed: PostgreSQL's (pushdown on, off, heap) to 12
significant digits, DuckDB's to 6 (its percentile interpolation differs in the last digits:
26322341.7 against PostgreSQL's 26322341.8 in one run).  Ratios are
otelspans' time over DuckDB's and over the heap's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_spans import BASE_NS, bench_database, ingest


def questions(begin: dt.datetime, end: dt.datetime) -> list[tuple[str, str, str]]:
    """(label, PostgreSQL SQL with {T}, DuckDB SQL over the view ``spans``)."""
    w = f"start_time >= '{begin.isoformat()}' AND start_time < '{end.isoformat()}'"
    day_begin = (end - dt.timedelta(hours=24)).isoformat()
    day = f"start_time >= '{day_begin}' AND start_time < '{end.isoformat()}'"
    return [
        (
            "percentile_cont(0.95) of duration per service",
            f"SELECT service_name, percentile_cont(0.95) WITHIN GROUP (ORDER BY duration)"
            f" FROM {{T}} WHERE {w} GROUP BY 1 ORDER BY 1",
            f"SELECT service_name, quantile_cont(duration, 0.95) FROM spans WHERE {w}"
            " GROUP BY 1 ORDER BY 1",
        ),
        (
            "errors per span name, top 10",
            f"SELECT name, count(*) AS errors FROM {{T}} WHERE {w} AND status = 'ERROR'"
            " GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 10",
            f"SELECT name, count(*) AS errors FROM spans WHERE {w} AND status = 'ERROR'"
            " GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 10",
        ),
        (
            "10 slowest spans",
            f"SELECT trace_id, span_id, name, duration FROM {{T}} WHERE {w}"
            " ORDER BY duration DESC, span_id LIMIT 10",
            f"SELECT trace_id, span_id, name, duration FROM spans WHERE {w}"
            " ORDER BY duration DESC, span_id LIMIT 10",
        ),
        (
            "count and avg duration per minute",
            f"SELECT date_trunc('minute', start_time) AS m, count(*), avg(duration)"
            f" FROM {{T}} WHERE {w} GROUP BY 1 ORDER BY 1",
            f"SELECT date_trunc('minute', start_time) AS m, count(*), avg(duration)"
            f" FROM spans WHERE {w} GROUP BY 1 ORDER BY 1",
        ),
        (
            "error rate per service, 24-hour window",
            f"SELECT service_name, count(*) FILTER (WHERE status = 'ERROR')::float8 / count(*)"
            f" FROM {{T}} WHERE {day} GROUP BY 1 ORDER BY 1",
            f"SELECT service_name, count(*) FILTER (WHERE status = 'ERROR')::double / count(*)"
            f" FROM spans WHERE {day} GROUP BY 1 ORDER BY 1",
        ),
    ]


def _norm(v: Any, digits: int = 12) -> Any:
    if isinstance(v, float | Decimal):
        return float(f"{float(v):.{digits}g}")
    if isinstance(v, dt.datetime):
        return v.astimezone(dt.UTC)
    return v


def _rows(rows: list[tuple[Any, ...]], digits: int = 12) -> list[tuple[Any, ...]]:
    return [tuple(_norm(v, digits) for v in r) for r in rows]


def best_pg(conn: psycopg.Connection, sql: str, runs: int) -> tuple[float, list[tuple[Any, ...]]]:
    times, rows = [], []
    for _ in range(runs):
        t = time.perf_counter()
        rows = conn.execute(sql).fetchall()
        times.append(time.perf_counter() - t)
    return min(times), rows


def best_duck(duck: Any, sql: str, runs: int) -> tuple[float, list[tuple[Any, ...]]]:
    times, rows = [], []
    for _ in range(runs):
        t = time.perf_counter()
        rows = duck.execute(sql).fetchall()
        times.append(time.perf_counter() - t)
    return min(times), rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=24)
    ap.add_argument("--hours", type=int, default=1)
    ap.add_argument("--spans", type=int, default=1_000_000, help="in all, over --hours")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--duckdb-threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()

    import duckdb

    cluster, store, dsn, conn = bench_database("otelspans-bench-dashboard-")
    try:
        t = time.perf_counter()
        ingest(
            dsn,
            store,
            seed=7,
            processes=args.processes,
            hours=args.hours,
            per_hour=args.spans // args.hours,
        )
        total = conn.execute("SELECT sum(nb_spans) FROM otel_blocks").fetchone()[0]  # type: ignore[index]
        print(
            f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cpus, python"
            f" {platform.python_version()}, duckdb {duckdb.__version__}"
        )
        print(
            f"ingested {total:,} spans, {args.processes} processes, {args.hours} h"
            f" ({time.perf_counter() - t:.1f} s)"
        )
        end = dt.datetime.fromtimestamp(BASE_NS / 1e9, dt.UTC) + dt.timedelta(hours=args.hours)
        begin = end - dt.timedelta(hours=1)
        day_begin = end - dt.timedelta(hours=24)
        t = time.perf_counter()
        n = conn.execute(
            "SELECT count(*) FROM otel_spans WHERE start_time >= %s AND start_time < %s",
            (day_begin, end),
        ).fetchone()[0]  # type: ignore[index]
        print(f"materialised {n:,} spans in {time.perf_counter() - t:.1f} s (one cold query)")
        conn.execute(
            "CREATE TABLE public.spans_heap AS SELECT * FROM otel_spans WHERE start_time >= %s"
            " AND start_time < %s",
            (day_begin, end),
        )
        conn.execute("VACUUM ANALYZE public.spans_heap")
        files = [
            f"{store.root}/{r[0]}"
            for r in conn.execute("SELECT path FROM otel_partition_files ORDER BY path")
        ]
        duck = duckdb.connect()
        duck.execute(f"SET threads = {args.duckdb_threads}")
        duck.execute("SET TimeZone = 'UTC'")
        duck.execute(f"CREATE VIEW spans AS SELECT * FROM read_parquet({files!r})")
        print(f"{len(files)} Parquet files; duckdb threads {args.duckdb_threads}")
        print()
        print(
            "| question | otelspans (pushdown) | otelspans (no pushdown) | native heap | DuckDB"
            " | pushdown / DuckDB | pushdown / heap |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        ok = True
        for label, pg_sql, duck_sql in questions(begin, end):
            conn.execute("SET otelspans.pushdown_upper = on")
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + pg_sql.format(T="otel_spans")))
            pushed = "Pushed" in plan
            t_on, r_on = best_pg(conn, pg_sql.format(T="otel_spans"), args.runs)
            conn.execute("SET otelspans.pushdown_upper = off")
            t_off, r_off = best_pg(conn, pg_sql.format(T="otel_spans"), args.runs)
            conn.execute("RESET otelspans.pushdown_upper")
            t_heap, r_heap = best_pg(conn, pg_sql.format(T="public.spans_heap"), args.runs)
            t_duck, r_duck = best_duck(duck, duck_sql, args.runs)
            # PostgreSQL's own answers must be identical; DuckDB interpolates percentiles
            # differently in the last digits, so it is compared to 6 significant digits
            same = _rows(r_on) == _rows(r_off) == _rows(r_heap)
            same &= _rows(r_on, 6) == _rows(r_duck, 6)
            ok &= same and pushed
            note = "" if pushed else " (not pushed!)"
            note += "" if same else " (ANSWERS DIFFER)"
            if not same:
                for name, r in (("no pushdown", r_off), ("heap", r_heap), ("duckdb", r_duck)):
                    diff = [(a, b) for a, b in zip(_rows(r_on), _rows(r), strict=False) if a != b]
                    if diff or len(r) != len(r_on):
                        print(f"pushdown vs {name}: {len(r_on)} / {len(r)} rows, {diff[:3]}")
            print(
                f"| {label}{note} | {t_on * 1000:.0f} ms | {t_off * 1000:.0f} ms |"
                f" {t_heap * 1000:.0f} ms | {t_duck * 1000:.0f} ms | {t_on / t_duck:.2f}x |"
                f" {t_on / t_heap:.2f}x |"
            )
        conn.close()
        return 0 if ok else 1
    finally:
        cluster.destroy()


if __name__ == "__main__":
    raise SystemExit(main())
