"""Host benchmark (issue 2): the bulk path and the row path against a native heap table.

Starts a throwaway PostgreSQL cluster, creates the same N rows x 8 columns (uuid, int8, text,
text, timestamptz, timestamptz, int8, float8) as (a) a foreign table on the bulk path (a cached
pyarrow Table), (b) a foreign table on the row path (cached Python tuples) and (c) a native heap
table, and times ``SELECT count(c1), ..., count(c8)`` on each: one warm-up run (which also builds
the wrappers' caches in the backend), then the best of ``--runs`` runs, all in one backend.
Prints rows/s and the ratios to the native table.

    /opt/otelspans/venv/bin/python bench/bench_host.py [--rows 1000000] [--runs 3]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from otelspans_fdw.devcluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = "c1 uuid, c2 int8, c3 text, c4 text, c5 timestamptz, c6 timestamptz, c7 int8, c8 float8"
QUERY = "SELECT " + ", ".join(f"count(c{k})" for k in range(1, 9)) + " FROM {table}"


def best_time(conn: psycopg.Connection, table: str, runs: int, expect: int) -> float:
    sql = QUERY.format(table=table)
    row = conn.execute(sql).fetchone()  # warm-up (builds the wrapper's cache)
    assert row is not None and all(c == expect for c in row), row
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        conn.execute(sql).fetchone()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-rows-path", action="store_true", help="only bulk and native")
    args = ap.parse_args()
    n = args.rows

    base = Path(tempfile.mkdtemp(prefix="otelspans-bench-"))
    cluster = LocalCluster(base)
    cluster.init([ROOT / "otelspans_fdw", ROOT / "bench" / "bench_wrappers.py"])
    cluster.start()
    try:
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION otelspans")
            conn.execute(
                "CREATE SERVER bulk FOREIGN DATA WRAPPER otelspans_fdw "
                "OPTIONS (wrapper 'bench_wrappers.BulkRows')"
            )
            conn.execute(
                "CREATE SERVER pyrows FOREIGN DATA WRAPPER otelspans_fdw "
                "OPTIONS (wrapper 'bench_wrappers.PythonRows')"
            )
            conn.execute(
                f"CREATE FOREIGN TABLE bulk_t ({COLUMNS}) SERVER bulk OPTIONS (rows '{n}')"
            )
            conn.execute(
                f"CREATE FOREIGN TABLE rows_t ({COLUMNS}) SERVER pyrows OPTIONS (rows '{n}')"
            )
            t = time.perf_counter()
            conn.execute("CREATE TABLE native_t AS SELECT * FROM bulk_t")
            conn.execute("VACUUM (FREEZE, ANALYZE) native_t")
            print(f"built the data and the native table in {time.perf_counter() - t:.1f} s")

            results: dict[str, float] = {}
            results["native heap table"] = best_time(conn, "native_t", args.runs, n)
            results["bulk path (Arrow)"] = best_time(conn, "bulk_t", args.runs, n)
            if not args.skip_rows_path:
                results["row path (Python tuples)"] = best_time(conn, "rows_t", args.runs, n)
            conn.execute("SET max_parallel_workers_per_gather = 0")
            results["native heap table, no parallel workers"] = best_time(
                conn, "native_t", args.runs, n
            )
            settings = conn.execute(
                "SELECT string_agg(name || '=' || setting, ', ' ORDER BY name) FROM pg_settings "
                "WHERE name IN ('jit', 'shared_buffers', 'work_mem')"
            ).fetchone()

        native = results["native heap table"]
        print(
            f"\n{n:,} rows x 8 columns, SELECT count(c1..c8), best of {args.runs} warm runs; "
            f"{platform.machine()}, {platform.python_version()}, PostgreSQL 15 "
            f"({settings[0] if settings else ''}, max_parallel_workers_per_gather default 2)\n"
        )
        print(f"{'source':<42} {'time':>9} {'rows/s':>14} {'vs native':>10}")
        for name, secs in results.items():
            print(f"{name:<42} {secs:>8.3f}s {n / secs:>14,.0f} {native / secs:>9.3f}x")
    finally:
        cluster.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
