"""otel_spans benchmark (issue 4): cold materialisation, warm scans, 1-minute windows, live data.

Starts a throwaway PostgreSQL cluster with the extension, writes demo traffic (the receiver's
demo trace model) as blocks straight through the ingestion code (payload in the store, then
metadata rows; insert time = block end + 1 s), spread over ``--hours`` hours, and measures
through SQL, all in the same run:

* decode rate of the blocks (Python, no I/O), and cold materialisation through SQL (spans/s);
* a warm full scan of one process, non-JSON columns and all columns, against the same rows
  copied into a native table (``SELECT count(c1), ..., count(cN)``, best of ``--runs``);
* a warm one-minute window in that process, with the store at 1x and then 10x the size;
* a scan of the whole process right after k new blocks arrive (cost should follow k).

    PYTHONPATH=. /opt/otelspans/venv/bin/python bench/bench_spans.py --processes 8 --hours 6
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import psycopg

from otelspans_fdw import db
from otelspans_fdw.devcluster import LocalCluster
from otelspans_fdw.ingest.decode import decode_request
from otelspans_fdw.ingest.metadata import write_blocks
from otelspans_fdw.lake.decode import BlockInfo, decode_block
from otelspans_fdw.loadgen import traffic
from otelspans_fdw.objstore import LocalStore
from otelspans_fdw.schema import COLUMNS

ROOT = Path(__file__).resolve().parent.parent
BASE_NS = 1_750_000_000 * 10**9
NON_JSON = [c.name for c in COLUMNS if c.sql_type != "jsonb"]
ALL = [c.name for c in COLUMNS]


def count_query(table: str, cols: list[str], where: str = "") -> str:
    return "SELECT " + ", ".join(f"count({c})" for c in cols) + f" FROM {table} {where}"


def ingest(
    dsn: str, store: LocalStore, *, seed: int, processes: int, hours: int, per_hour: int
) -> list[bytes]:
    """Write the blocks of ``hours`` hours of demo traffic; return the payloads."""
    model = traffic.TraceModel(seed=seed, processes=processes, base_time_ns=BASE_NS)
    payloads = []
    with psycopg.connect(dsn) as c:
        for slot in range(hours * 12):  # SDK-like: one export per process every 5 minutes
            model.clock = BASE_NS + slot * 300 * 10**9
            for body in traffic.encode_requests(model, per_hour // 12, 1000):
                blocks = decode_request(body).blocks
                for b in blocks:
                    store.put_if_absent(b.object_path, b.payload)
                    payloads.append(b.payload)
                write_blocks(c, blocks)
        c.execute("UPDATE otel_blocks SET insert_time = end_time + interval '1 second'")
    return payloads


def best(conn: psycopg.Connection, sql: str, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        conn.execute(sql).fetchall()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_database(prefix: str) -> tuple[LocalCluster, LocalStore, str, psycopg.Connection]:
    """A throwaway cluster with the extension, a database ``bench`` and a local store.

    The caller destroys the cluster; the store lives next to it in the same temporary
    directory (world-writable: the backend writes partitions there).
    """
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    cluster = LocalCluster(base / "pg")
    cluster.init([ROOT / "otelspans_fdw"])
    cluster.start()
    store_dir = base / "store"
    store_dir.mkdir()
    store_dir.chmod(0o777)
    with psycopg.connect(cluster.dsn(), autocommit=True) as c:
        c.execute("CREATE DATABASE bench")
    dsn = cluster.dsn("bench")
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute("CREATE EXTENSION otelspans")
    conn.execute(f"ALTER SERVER otel_spans_server OPTIONS (ADD store '{store_dir}')")
    db.migrate(conn)
    # migrate pins search_path to pg_catalog first; the benchmark's own tables go to public
    conn.execute("SET search_path = public")
    return cluster, LocalStore(store_dir, durable=False), dsn, conn


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--hours", type=int, default=6)
    ap.add_argument("--spans-per-hour", type=int, default=40_000, help="all processes")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    cluster, store, dsn, conn = bench_database("otelspans-bench-spans-")
    try:
        t = time.perf_counter()
        payloads = ingest(
            dsn,
            store,
            seed=42,
            processes=args.processes,
            hours=args.hours,
            per_hour=args.spans_per_hour,
        )
        total = conn.execute("SELECT sum(nb_spans) FROM otel_blocks").fetchone()[0]
        print(
            f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cpus, "
            f"python {platform.python_version()}"
        )
        print(
            f"ingested {total:,} spans in {len(payloads)} blocks, {args.processes} processes, "
            f"{args.hours} h ({time.perf_counter() - t:.1f} s)"
        )

        # decode only (the CPU part of materialisation)
        import uuid

        info = BlockInfo(uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), dt.datetime.now(dt.UTC))
        t = time.perf_counter()
        decoded = sum(decode_block(p, info).num_rows for p in payloads)
        decode_rate = decoded / (time.perf_counter() - t)

        pids = [
            r[0]
            for r in conn.execute(
                "SELECT process_id FROM otel_blocks GROUP BY 1 ORDER BY sum(nb_spans) DESC"
            )
        ]
        t = time.perf_counter()
        cold_rows = 0
        for pid in pids:
            cold_rows += conn.execute(
                "SELECT count(*) FROM otel_spans WHERE process_id = %s", (pid,)
            ).fetchone()[0]
        cold = time.perf_counter() - t
        assert (
            cold_rows
            == total - conn.execute("SELECT sum(nb_rejected) FROM otel_blocks").fetchone()[0]
        )

        pid = pids[0]
        where = f"WHERE process_id = '{pid}'"
        nrows = conn.execute(f"SELECT count(*) FROM otel_spans {where}").fetchone()[0]
        conn.execute(f"CREATE TABLE native AS SELECT * FROM otel_spans {where}")
        conn.execute("VACUUM ANALYZE native")
        f_non = best(conn, count_query("otel_spans", NON_JSON, where), args.runs)
        n_non = best(conn, count_query("native", NON_JSON), args.runs)
        f_all = best(conn, count_query("otel_spans", ALL, where), args.runs)
        n_all = best(conn, count_query("native", ALL), args.runs)

        mid = conn.execute(
            "SELECT start_time FROM native ORDER BY start_time OFFSET %s LIMIT 1", (nrows // 2,)
        ).fetchone()[0] - dt.timedelta(seconds=30)
        win = (
            f"SELECT * FROM otel_spans {where} AND end_time >= '{mid.isoformat()}'"
            f" AND start_time <= '{(mid + dt.timedelta(minutes=1)).isoformat()}'"
        )
        conn.execute(win).fetchall()
        win_rows = len(conn.execute(win).fetchall())

        def window_latency() -> float:
            ts = []
            for _ in range(max(args.runs, 10)):
                t0 = time.perf_counter()
                conn.execute(win).fetchall()
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts)

        w1 = window_latency()

        # live ingestion: k new blocks for the measured process, then a full scan
        live = []
        model = traffic.TraceModel(seed=42, processes=args.processes, base_time_ns=BASE_NS)
        proc_attrs = None
        for p in model.processes:
            if demo_pid(p) == pid:
                proc_attrs = p
        warm_full = best(conn, f"SELECT count(*) FROM otel_spans {where}", 3)
        for k in (1, 4, 16):
            added = add_live_blocks(dsn, store, pid, k, model, proc_attrs)
            t0 = time.perf_counter()
            conn.execute(f"SELECT count(*) FROM otel_spans {where}").fetchone()
            live.append((k, added, time.perf_counter() - t0))

        # 10x store: nine more times the data, other processes
        t = time.perf_counter()
        for s in range(9):
            ingest(
                dsn,
                store,
                seed=1000 + s,
                processes=args.processes,
                hours=args.hours,
                per_hour=args.spans_per_hour,
            )
        total10 = conn.execute("SELECT sum(nb_spans) FROM otel_blocks").fetchone()[0]
        print(f"10x: {total10:,} spans ({time.perf_counter() - t:.1f} s to ingest)")
        conn.execute(win).fetchall()
        w10 = window_latency()

        print()
        print("| measure | value |")
        print("| --- | ---: |")
        print(f"| decode only (Python, distinct blocks) | {decode_rate:,.0f} spans/s |")
        print(
            f"| cold materialisation via SQL ({len(pids)} processes, {cold_rows:,} spans) |"
            f" {cold_rows / cold:,.0f} spans/s ({cold:.2f} s) |"
        )
        print(
            f"| warm full scan, non-JSON columns ({nrows:,} rows) | {f_non * 1000:.0f} ms,"
            f" {nrows / f_non:,.0f} rows/s; native {n_non * 1000:.0f} ms;"
            f" ratio {n_non / f_non:.2f}x |"
        )
        print(
            f"| warm full scan, all columns | {f_all * 1000:.0f} ms, {nrows / f_all:,.0f} rows/s;"
            f" native {n_all * 1000:.0f} ms; ratio {n_all / f_all:.2f}x |"
        )
        print(
            f"| 1-minute window, warm, store 1x ({win_rows} rows) | {w1 * 1000:.1f} ms (median) |"
        )
        print(
            f"| 1-minute window, warm, store 10x | {w10 * 1000:.1f} ms (median);"
            f" growth {w10 / w1:.2f}x |"
        )
        print(f"| warm full scan count(*) of the process | {warm_full * 1000:.0f} ms |")
        for k, added, secs in live:
            print(f"| full scan after {k} new block(s) ({added} spans) | {secs * 1000:.0f} ms |")
        conn.close()
    finally:
        cluster.destroy()
    return 0


def demo_pid(p: object) -> object:
    from otelspans_fdw.ingest.identity import process_id

    return process_id(p.attributes)  # type: ignore[attr-defined]


def add_live_blocks(
    dsn: str, store: LocalStore, pid: object, k: int, model: traffic.TraceModel, proc: object
) -> int:
    """k new blocks of 1,000 spans for the process ``pid``, inserted now."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    added = 0
    with psycopg.connect(dsn) as c:
        for i in range(k):
            req = ExportTraceServiceRequest()
            rs = req.resource_spans.add()
            rs.resource.attributes.extend(traffic.kvs(proc.attributes))  # type: ignore[attr-defined]
            ss = rs.scope_spans.add()
            ss.scope.name = "live"
            specs = list(model.spans(1000))
            for s in specs:
                traffic.fill_span(ss.spans.add(), s)
            ss.scope.version = f"{time.time_ns()}-{i}"  # distinct payloads
            blocks = decode_request(req.SerializeToString()).blocks
            assert blocks[0].process.process_id == pid
            for b in blocks:
                store.put_if_absent(b.object_path, b.payload)
                added += b.nb_spans
            write_blocks(c, blocks)
    return added


if __name__ == "__main__":
    raise SystemExit(main())
