"""History benchmark: does a query's cost grow with the store's age, or only with its answer?

On a throwaway cluster with the extension: a real store (demo traffic of ``--processes``
processes over one hour, one block per process every 10 s, written through the ingestion code
with the trace index, insert time = span time as live ingestion gives), every partition
materialised; then the four queries below, warm (median of ``--runs`` after warm-up runs).
Then synthetic block *history* is added before the store's first hour as metadata rows only
(one block per process every 10 s, insert time = span time, payloads absent: no query of the
store's hours may read them), first up to 7 days, then up to 30, and the queries are measured
again, with their growth against no history:

* one process, 1-minute window, ``count(*)``;
* trace by id (a different trace each run, all columns, every row fetched);
* all processes, 5-minute window, ``count(*)``;
* ``otel_processes JOIN otel_spans``, 1-minute window, ``count(*)``.

    PYTHONPATH=. /opt/otelspans/venv/bin/python bench/bench_history.py --days 7,30

Runs against whatever tree ``otelspans_fdw`` is imported from (the cluster loads the modules
next to this file): to measure another tree, run its copy of this script.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_spans import bench_database

from otelspans_fdw.ingest.decode import decode_request
from otelspans_fdw.ingest.metadata import write_blocks
from otelspans_fdw.loadgen import traffic
from otelspans_fdw.objstore import LocalStore

BASE_NS = 1_750_000_000 * 10**9
BASE = dt.datetime.fromtimestamp(BASE_NS // 10**9, dt.UTC)
#: History ends at the start of the store's first insert hour, so that no partition the
#: queries read holds a history block (whose payload is absent).
HISTORY_END = BASE.replace(minute=0, second=0, microsecond=0)
SLOT_S = 10


def ingest(dsn: str, store: LocalStore, spans: int, processes: int) -> list[str]:
    """One hour of demo traffic from ``BASE``, a slot every 10 s; returns the trace ids."""
    model = traffic.TraceModel(seed=7, processes=processes, base_time_ns=BASE_NS)
    slots = 3600 // SLOT_S
    traces: set[str] = set()
    with psycopg.connect(dsn) as c:
        for slot in range(slots):
            model.clock = BASE_NS + slot * SLOT_S * 10**9
            for body in traffic.encode_requests(model, spans // slots, 10_000):
                blocks = decode_request(body).blocks
                for b in blocks:
                    store.put_if_absent(b.object_path, b.payload)
                    traces.update(t.hex() for t in b.traces)
                write_blocks(c, blocks)
            c.commit()
        # insert time = span time (a live receiver stores a block seconds after its spans)
        c.execute("UPDATE otel_blocks SET insert_time = greatest(end_time, begin_time)")
    return sorted(traces)


def add_history(conn: psycopg.Connection, from_day: int, to_day: int) -> int:
    """Blocks for days ``[from_day, to_day)`` before ``HISTORY_END`` (metadata rows only), one
    per process every 10 s, inserted as their spans end (so strictly before ``HISTORY_END``),
    one transaction per day; returns the number inserted."""
    added = 0
    for day in range(from_day, to_day):
        hi = HISTORY_END - dt.timedelta(days=day)
        lo = hi - dt.timedelta(days=1)
        n = conn.execute(
            """
            INSERT INTO otel_blocks (block_id, stream_id, process_id, begin_time, end_time,
                begin_time_ns, end_time_ns, nb_spans, payload_size, object_path, insert_time)
            SELECT gen_random_uuid(), s.stream_id, s.process_id, t, t + interval '9 seconds',
                   (extract(epoch FROM t) * 1e9)::int8,
                   (extract(epoch FROM t + interval '9 seconds') * 1e9)::int8,
                   40, 4000, 'history/absent/' || s.process_id || '/' || extract(epoch FROM t),
                   t + interval '9 seconds'
            FROM otel_streams s,
                 generate_series(%s::timestamptz, %s::timestamptz - interval '10 seconds',
                                 interval '10 seconds') AS t
            """,
            (lo, hi),
        ).rowcount
        added += n
    conn.execute("VACUUM ANALYZE otel_blocks")
    return added


def median_ms(conn: psycopg.Connection, sqls: list[tuple[str, tuple]], runs: int) -> float:
    """Median of ``runs`` timed executions after two untimed ones (cycling over ``sqls``)."""
    for sql, params in sqls[:2]:
        conn.execute(sql, params).fetchall()
    times = []
    for i in range(runs):
        sql, params = sqls[i % len(sqls)]
        t = time.perf_counter()
        conn.execute(sql, params).fetchall()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def queries(conn: psycopg.Connection, traces: list[str]) -> dict[str, list[tuple[str, tuple]]]:
    pid = conn.execute(
        "SELECT process_id FROM otel_blocks WHERE begin_time >= %s"
        " GROUP BY 1 ORDER BY sum(nb_spans) DESC LIMIT 1",
        (BASE,),
    ).fetchone()[0]
    mid = BASE + dt.timedelta(minutes=30)
    m1, m5 = mid + dt.timedelta(minutes=1), mid + dt.timedelta(minutes=5)
    rng = random.Random(1)
    return {
        "one process, 1-minute window, count(*)": [
            (
                "SELECT count(*) FROM otel_spans WHERE process_id = %s"
                " AND start_time >= %s AND start_time < %s",
                (pid, mid, m1),
            )
        ],
        "trace by id": [
            ("SELECT * FROM otel_spans WHERE trace_id = %s", (t,))
            for t in rng.sample(traces, min(50, len(traces)))
        ],
        "all processes, 5-minute window": [
            (
                "SELECT count(*) FROM otel_spans WHERE start_time >= %s AND start_time < %s",
                (mid, m5),
            )
        ],
        "otel_processes JOIN otel_spans, 1-minute window": [
            (
                "SELECT count(*) FROM otel_processes p JOIN otel_spans s USING (process_id)"
                " WHERE s.start_time >= %s AND s.start_time < %s",
                (mid, m1),
            )
        ],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spans", type=int, default=300_000, help="spans in the real store")
    ap.add_argument("--processes", type=int, default=24)
    ap.add_argument("--days", default="7,30", help="history sizes, increasing (days)")
    ap.add_argument("--runs", type=int, default=15, help="timed runs per query and size")
    args = ap.parse_args()
    days = [int(d) for d in args.days.split(",")]

    cluster, store, dsn, conn = bench_database("otelspans-bench-history-")
    try:
        print(
            f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cpus,"
            f" python {platform.python_version()}, load {os.getloadavg()[0]:.2f}"
        )
        t = time.perf_counter()
        traces = ingest(dsn, store, args.spans, args.processes)
        nspans, nblocks = conn.execute("SELECT sum(nb_spans), count(*) FROM otel_blocks").fetchone()
        print(
            f"store: {nspans:,} spans in {nblocks:,} blocks, {args.processes} processes,"
            f" {len(traces):,} traces ({time.perf_counter() - t:.1f} s)"
        )
        t = time.perf_counter()
        for (pid,) in conn.execute("SELECT process_id FROM otel_processes").fetchall():
            conn.execute("SELECT count(*) FROM otel_spans WHERE process_id = %s", (pid,))
        print(f"materialised every partition ({time.perf_counter() - t:.1f} s)")
        conn.execute("VACUUM ANALYZE")
        qs = queries(conn, traces)

        results: dict[str, list[float]] = {name: [] for name in qs}
        labels = ["no history"]
        for name, sqls in qs.items():
            results[name].append(median_ms(conn, sqls, args.runs))
            print(f"  {name}: {results[name][-1]:.1f} ms", flush=True)
        done = 0
        for d in days:
            t = time.perf_counter()
            add_history(conn, done, d)
            done = d
            total = conn.execute("SELECT count(*) FROM otel_blocks").fetchone()[0]
            print(f"history: {d} days, {total:,} blocks in all ({time.perf_counter() - t:.0f} s)")
            labels.append(f"{d} days ({total / 1e6:.2f}M blocks)")
            for name, sqls in qs.items():
                results[name].append(median_ms(conn, sqls, args.runs))
                print(f"  {name}: {results[name][-1]:.1f} ms", flush=True)

        print()
        print("| query (warm, median) | " + " | ".join(labels) + " |")
        print("| --- |" + " ---: |" * len(labels))
        for name, vals in results.items():
            cells = [f"{vals[0]:.1f} ms"] + [f"{v:.1f} ms (x{v / vals[0]:.2f})" for v in vals[1:]]
            print(f"| {name} | " + " | ".join(cells) + " |")
        conn.close()
    finally:
        cluster.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
