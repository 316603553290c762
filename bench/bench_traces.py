"""Trace-by-id benchmark (issue 6): ``WHERE trace_id = X`` without a process, 1M vs 10M spans.

For each store size, on a throwaway PostgreSQL cluster with the extension: demo traffic (the
receiver's multi-service trace model, 6 processes) is written as blocks straight through the
ingestion code (payload in the store, then metadata rows *with the trace index*; insert time =
block end + 1 s, so partitions follow event time as with a live receiver), then measured
through SQL (``SELECT * FROM otel_spans WHERE trace_id = %s``, every column, all rows fetched):

* **first lookup** on a never-queried store: includes the just-in-time materialisation of the
  partitions holding the trace's blocks (whole process-hours);
* **warm**: partitions materialised, same backend, a different random trace each query
  (median and p95 over ``--lookups``);
* **cold backend**: a new connection per lookup (backend start, Python and wrapper start-up,
  metadata connection), partitions materialised.

Each sampled trace's row count is checked against a scan of the same trace through the process
route (every process, ``trace_id`` as a plain filter), which does not use the trace index.

    PYTHONPATH=. /opt/otelspans/venv/bin/python bench/bench_traces.py --sizes 1000000,10000000

``--history-days N`` then adds N days of block history before the store (metadata rows only,
as ``bench_history.py`` does) and measures the warm lookups again.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from otelspans_fdw import db
from otelspans_fdw.devcluster import LocalCluster
from otelspans_fdw.ingest.decode import decode_request
from otelspans_fdw.ingest.metadata import write_blocks
from otelspans_fdw.loadgen import traffic
from otelspans_fdw.objstore import LocalStore

ROOT = Path(__file__).resolve().parent.parent
BASE_NS = 1_750_000_000 * 10**9
LOOKUP = "SELECT * FROM otel_spans WHERE trace_id = %s"
CHUNK = 200_000


def ingest(dsn: str, store: LocalStore, spans: int, seed: int) -> list[str]:
    """Write about ``spans`` spans of demo traffic; return every trace id (hex)."""
    model = traffic.TraceModel(seed=seed, processes=6, base_time_ns=BASE_NS)
    traces: list[str] = []
    done = 0
    with psycopg.connect(dsn) as c:
        while done < spans:
            for body in traffic.encode_requests(model, min(CHUNK, spans - done), 1000):
                blocks = decode_request(body).blocks
                for b in blocks:
                    store.put_if_absent(b.object_path, b.payload)
                    traces.extend(t.hex() for t in b.traces)
                    done += b.nb_spans
                write_blocks(c, blocks)
            c.commit()
        c.execute("UPDATE otel_blocks SET insert_time = end_time + interval '1 second'")
    return sorted(set(traces))


def timed(conn: psycopg.Connection, trace_id: str) -> tuple[float, int]:
    t = time.perf_counter()
    n = len(conn.execute(LOOKUP, (trace_id,)).fetchall())
    return time.perf_counter() - t, n


def ms(x: float) -> str:
    return f"{x * 1000:.1f} ms"


def breakdown(conn: psycopg.Connection, store: LocalStore, sample: list[str]) -> None:
    """Median time of each step of a warm trace lookup, run here (not in the backend)."""
    from otelspans_fdw.lake import footers, partitions
    from otelspans_fdw.lake.filters import request_expression
    from otelspans_fdw.lake.spans import SpansLake
    from otelspans_fdw.lake.trace_index import blocks_for_traces
    from otelspans_fdw.multicorn_api import Qual
    from otelspans_fdw.quals import scan_request
    from otelspans_fdw.schema import COLUMN_NAMES

    lake = SpansLake(conn, store)
    cache = footers.FooterCache()
    steps: dict[str, list[float]] = {}

    def step(name: str, t: float) -> float:
        now = time.perf_counter()
        steps.setdefault(name, []).append(now - t)
        return now

    for _ in range(2):
        for tid in sample:
            req = scan_request([Qual("trace_id", "=", tid)])
            t = time.perf_counter()
            blocks_for_traces(conn, [tid])
            t = step("trace index", t)
            scope = lake.scope(req)
            t = step("scope (index + partition states)", t)
            keys = [(s.process_id, s.hour) for s in scope.states]
            files = partitions.files_for_scan(conn, keys, scope.req.window)
            t = step("files", t)
            sel = footers.select_row_groups(cache, store, [f.path for f in files], scope.req.window)
            t = step("row-group selection (cached footers)", t)
            rd = footers.read_trace_rows(
                store,
                sel,
                list(COLUMN_NAMES),
                [tid],
                request_expression(scope.req),
                ["start_time", "end_time", "trace_id"],
            )
            rd.read_all()
            step("read the trace's rows of the selected row groups", t)
    for name, v in steps.items():
        print(f"  {name}: median {ms(statistics.median(v[len(sample) :]))}")


def run_size(cluster: LocalCluster, base: Path, spans: int, args: argparse.Namespace) -> dict:
    name = f"b{spans}"
    store_dir = base / f"store-{name}"
    store_dir.mkdir()
    store_dir.chmod(0o777)
    with psycopg.connect(cluster.dsn(), autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    dsn = cluster.dsn(name)
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute("CREATE EXTENSION otelspans")
    conn.execute(f"ALTER SERVER otel_spans_server OPTIONS (ADD store '{store_dir}')")
    db.migrate(conn)

    t = time.perf_counter()
    traces = ingest(dsn, LocalStore(store_dir, durable=False), spans, args.seed)
    t_ingest = time.perf_counter() - t
    total, blocks, hours = conn.execute(
        "SELECT sum(nb_spans), count(*), count(DISTINCT date_bin('1 hour', insert_time,"
        " 'epoch')) FROM otel_blocks"
    ).fetchone()  # type: ignore[misc]
    pids = [r[0] for r in conn.execute("SELECT process_id FROM otel_processes ORDER BY 1")]
    print(
        f"\n{total:,} spans, {len(traces):,} traces, {blocks:,} blocks, {len(pids)} processes,"
        f" {hours} insert hours (ingested in {t_ingest:.1f} s)"
    )
    rnd = random.Random(args.seed)
    sample = rnd.sample(traces, args.lookups + 1)

    first, n_first = timed(conn, sample[0])
    parts = conn.execute("SELECT count(*), sum(nb_rows) FROM otel_partitions").fetchone()
    print(
        f"first lookup (JIT materialises {parts[0]} partitions, {parts[1]:,} rows):"  # type: ignore[index]
        f" {first:.2f} s, {n_first} rows"
    )
    t = time.perf_counter()
    for pid in pids:  # materialise everything else
        conn.execute("SELECT count(*) FROM otel_spans WHERE process_id = %s", (pid,)).fetchall()
    t_mat = time.perf_counter() - t
    files = conn.execute("SELECT count(*), max(nb_rows) FROM otel_partition_files").fetchone()
    print(
        f"materialised the rest in {t_mat:.1f} s; {files[0]} files, largest"  # type: ignore[index]
        f" {files[1]:,} rows"  # type: ignore[index]
    )

    # Correctness: the trace route returns what the process route (no trace index) returns.
    for tid in sample[:3]:
        via_process = conn.execute(
            "SELECT count(*) FROM otel_spans WHERE process_id = ANY(%s) AND trace_id = %s",
            (pids, tid),
        ).fetchone()[0]  # type: ignore[index]
        got = timed(conn, tid)[1]
        assert got == via_process and got > 0, (tid, got, via_process)

    for tid in sample[1:4]:  # warm the backend's caches
        timed(conn, tid)
    warm = [timed(conn, tid)[0] for tid in sample[1:]]
    cold = []
    for tid in sample[1 : 1 + args.cold]:
        t = time.perf_counter()
        with psycopg.connect(dsn, autocommit=True) as c2:
            c2.execute(LOOKUP, (tid,)).fetchall()
        cold.append(time.perf_counter() - t)
    breakdown(conn, LocalStore(store_dir, durable=False), sample[1:11])
    warm_history = None
    if args.history_days:
        # Block history before the store's first hour (metadata rows only, one block per
        # process every 10 s, as bench_history.py adds it): the lookups must not notice.
        from bench_history import add_history

        t = time.perf_counter()
        added = add_history(conn, 0, args.history_days)
        print(
            f"history: {args.history_days} days, {added:,} blocks ({time.perf_counter() - t:.0f} s)"
        )
        for tid in sample[1:4]:
            timed(conn, tid)
        warm_history = [timed(conn, tid)[0] for tid in sample[1:]]
        print(
            f"warm with history: median {ms(statistics.median(warm_history))},"
            f" p95 {ms(sorted(warm_history)[int(0.95 * (len(warm_history) - 1))])}"
        )
    explain = "\n".join(
        r[0]
        for r in conn.execute(
            "EXPLAIN (VERBOSE) SELECT * FROM otel_spans WHERE trace_id = %s", (sample[1],)
        )
        if "Wrapper" in r[0]
    )
    conn.close()
    res = {
        "spans": total,
        "first": first,
        "warm_median": statistics.median(warm),
        "warm_p95": sorted(warm)[int(0.95 * (len(warm) - 1))],
        "cold_median": statistics.median(cold),
        "warm_history": statistics.median(warm_history) if warm_history else None,
    }
    print(
        f"warm: median {ms(res['warm_median'])}, p95 {ms(res['warm_p95'])} ({len(warm)} traces);"
        f" cold backend: median {ms(res['cold_median'])} ({len(cold)})"
    )
    print(explain)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000,10000000", help="comma-separated span counts")
    ap.add_argument("--lookups", type=int, default=40)
    ap.add_argument("--cold", type=int, default=5)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--keep", action="store_true", help="leave the cluster running")
    ap.add_argument(
        "--history-days",
        type=int,
        default=0,
        help="then add this much block history, measure again",
    )
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="otelspans-bench-traces-"))
    base.chmod(0o755)  # the cluster runs as postgres
    cluster = LocalCluster(base / "pg")
    cluster.init([ROOT / "otelspans_fdw"])
    cluster.start()
    print(
        f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cpus,"
        f" python {platform.python_version()}"
    )
    try:
        results = [run_size(cluster, base, int(s), args) for s in args.sizes.split(",")]
    finally:
        if args.keep:
            print(f"kept: {cluster.dsn()} (base {base})")
        else:
            cluster.destroy()
            shutil.rmtree(base, ignore_errors=True)  # the stores
    if len(results) > 1:
        a, b = results[0], results[-1]
        warm = b["warm_median"] / a["warm_median"]
        cold = b["cold_median"] / a["cold_median"]
        print(
            f"\ngrowth {a['spans']:,} -> {b['spans']:,} spans: warm x{warm:.2f}, cold x{cold:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
