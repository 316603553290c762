"""Trace index benchmark (issue 6): its ingestion cost, and index vs per-block bloom filters.

Part 1 (always): the same pre-encoded demo traffic (requests of ``--batch`` spans, one process
per request) is sent over OTLP/HTTP to ``otelspans serve`` with the trace index on and with
``--no-trace-index``, alternating for ``--rounds`` rounds, each run on a fresh database and
store; prints spans/s of every run, the best of each mode and their ratio, and the index's
rows and bytes per span.

Part 2 (``--lookup``): what a trace-by-id lookup costs in the two designs at the sizes of the
issue's goals (1M and 10M spans), on synthetic metadata shaped like part 1's (blocks of
``--batch`` spans, the measured distinct-traces-per-block ratio):
(a) ``otel_trace_blocks`` + its B-tree, through :func:`otelspans_fdw.traces.blocks_for_traces`;
(b) one bloom filter per block (1% false positives, k=7) scanned with ``get_bit``.
Prints warm median latencies and, for (b), the false-positive blocks a lookup drags in.

    /opt/otelspans/venv/bin/python bench/bench_trace_index.py --spans 1000000 --rounds 2 --lookup
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg

# Measure the working tree, not whatever copy of the package is installed in the venv.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_ingest import peak_rss_mib, start_receiver  # noqa: E402

from otelspans_fdw import db  # noqa: E402
from otelspans_fdw.devcluster import LocalCluster  # noqa: E402
from otelspans_fdw.ingest import demo  # noqa: E402
from otelspans_fdw.ingest.decode import decode_request  # noqa: E402
from otelspans_fdw.traces import blocks_for_traces  # noqa: E402


def ingest_run(
    cluster: LocalCluster,
    base: Path,
    name: str,
    bodies: list[bytes],
    counts: list[int],
    concurrency: int,
    index: bool,
    lanes: int,
) -> dict[str, float]:
    """One receiver on a fresh database: send everything over HTTP, check, measure."""
    with psycopg.connect(cluster.dsn(), autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    extra = ([] if index else ["--no-trace-index"]) + ["--commit-lanes", str(lanes)]
    proc, hport, _ = start_receiver(cluster.dsn(name), base / f"store-{name}", extra)
    try:
        t0 = time.monotonic()
        sent, failed = asyncio.run(
            demo.send_raw(
                bodies,
                counts,
                protocol="http",
                endpoint=f"127.0.0.1:{hport}",
                concurrency=concurrency,
                token=None,
                progress=demo.Progress(sum(counts), enabled=False),
            )
        )
        dt = time.monotonic() - t0
        rss = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    with psycopg.connect(cluster.dsn(name)) as c:
        stored, blocks = c.execute("SELECT sum(nb_spans), count(*) FROM otel_blocks").fetchone()
        rows, size = c.execute(
            "SELECT count(*), pg_total_relation_size('otel_trace_blocks') FROM otel_trace_blocks"
        ).fetchone()
    if failed or stored != sum(counts):
        raise SystemExit(f"{name}: {failed} failed requests, {stored} spans stored")
    if index != (rows > 0):
        raise SystemExit(f"{name}: index {'on' if index else 'off'} but {rows} index rows")
    return {
        "spans_s": sent / dt,
        "seconds": dt,
        "rss": rss,
        "blocks": blocks,
        "rows": rows,
        "bytes": size,
    }


def part1(cluster: LocalCluster, base: Path, args: argparse.Namespace) -> float:
    """Index on/off ingestion; returns index rows per span (for part 2)."""
    model = demo.TraceModel(seed=42, processes=8, base_time_ns=1_750_000_000 * 10**9)
    bodies = demo.encode_requests(model, args.spans, args.batch)
    counts = [decode_request(b).nb_spans for b in bodies]
    total = sum(counts)
    print(
        f"pre-encoded {len(bodies)} requests, {total:,} spans, batch {args.batch}, "
        f"{args.concurrency} clients, receiver --commit-lanes {args.commit_lanes}"
    )
    best: dict[bool, float] = {True: 0.0, False: 0.0}
    per_span = 0.0
    for rnd in range(args.rounds):
        order = (True, False) if rnd % 2 == 0 else (False, True)
        for index in order:
            name = f"r{rnd}_{'on' if index else 'off'}"
            r = ingest_run(
                cluster, base, name, bodies, counts, args.concurrency, index, args.commit_lanes
            )
            best[index] = max(best[index], r["spans_s"])
            extra = ""
            if index:
                per_span = r["rows"] / total
                extra = (
                    f"; index {r['rows']:,} rows ({per_span:.2f}/span, "
                    f"{r['rows'] / r['blocks']:.0f}/block), {r['bytes'] / 2**20:.0f} MiB "
                    f"({r['bytes'] / total:.0f} B/span)"
                )
            print(
                f"  round {rnd} index {'on ' if index else 'off'}: {total:,} spans in "
                f"{r['seconds']:.2f} s = {r['spans_s']:,.0f} spans/s, "
                f"peak RSS {r['rss']:.0f} MiB{extra}",
                flush=True,
            )
    ratio = best[True] / best[False]
    print(
        f"HTTP ingest, best of {args.rounds}: index on {best[True]:,.0f} spans/s, "
        f"off {best[False]:,.0f} spans/s, on/off = {ratio:.3f} "
        f"({(1 - ratio) * 100:+.1f}% slower with the index)"
    )
    return per_span


def _timed(fn: Callable[[], object], n: int) -> float:
    """Median wall time in ms of ``n`` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)


def lookup_at(dsn: str, spans: int, batch: int, per_span: float) -> None:
    """Build synthetic metadata for ``spans`` spans and time one lookup in both designs."""
    nblocks = spans // batch
    per_block = max(1, round(per_span * batch))
    bits = 1 << math.ceil(math.log2(per_block * 9.6))  # 1% false positives, power of two
    k = 7
    with psycopg.connect(dsn, autocommit=True) as c:
        db.migrate(c)
        t0 = time.monotonic()
        c.execute(
            "INSERT INTO otel_processes (process_id, start_time, properties)"
            " SELECT ('00000000-0000-0000-0000-'||lpad(to_hex(g), 12, '0'))::uuid, now(), '{}'"
            " FROM generate_series(1, 8) g"
        )
        c.execute(
            "INSERT INTO otel_streams (stream_id, process_id, tags, format)"
            " SELECT process_id, process_id, '{trace}', 'otlp/v1/traces' FROM otel_processes"
        )
        c.execute(
            "INSERT INTO otel_blocks (block_id, stream_id, process_id, begin_time, end_time,"
            " nb_spans, payload_size, object_path)"
            " SELECT gen_random_uuid(), p, p, now(), now(), %s, 0, ''"
            " FROM generate_series(1, %s) g,"
            " LATERAL (SELECT ('00000000-0000-0000-0000-'||lpad(to_hex(g %% 8 + 1), 12, '0'))"
            "   ::uuid) AS x(p)",
            (batch, nblocks),
        )
        c.execute(
            "INSERT INTO otel_trace_blocks SELECT gen_random_uuid(), block_id, process_id,"
            " begin_time, end_time FROM otel_blocks, generate_series(1, %s)",
            (per_block,),
        )
        c.execute("ANALYZE otel_trace_blocks")
        c.execute("ANALYZE otel_blocks")
        # (b): a bloom filter per block at ~50% fill (an optimally sized full filter), k probes.
        c.execute(
            "CREATE TABLE bloom AS SELECT block_id, process_id, decode(string_agg("
            " lpad(to_hex((random() * 4294967295)::bigint), 8, '0'), ''), 'hex') AS f"
            " FROM otel_blocks, generate_series(1, %s) GROUP BY block_id, process_id",
            (bits // 32,),
        )
        build = time.monotonic() - t0
        tids = [r[0].hex for r in c.execute("SELECT trace_id FROM otel_trace_blocks LIMIT 200")]
    with psycopg.connect(dsn, autocommit=True) as c:
        it = iter(tids * 10)
        idx_ms = _timed(lambda: blocks_for_traces(c, [next(it)]), 200)
        rnd = random.Random(1)
        probes = " AND ".join("get_bit(f, %s) = 1" for _ in range(k))
        sql = f"SELECT block_id, process_id FROM bloom WHERE {probes}"
        fp: list[int] = []

        def bloom() -> None:
            fp.append(len(c.execute(sql, [rnd.randrange(bits) for _ in range(k)]).fetchall()))

        bloom_ms = _timed(bloom, 30)
    print(
        f"  {spans:>12,} spans: {nblocks:,} blocks, {nblocks * per_block:,} index rows "
        f"(built in {build:.0f} s); (a) index lookup {idx_ms:.2f} ms; "
        f"(b) bloom scan ({bits} bits/block) {bloom_ms:.1f} ms, "
        f"{statistics.mean(fp):.1f} false-positive blocks per lookup"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spans", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="on/off pairs, alternating order")
    ap.add_argument("--commit-lanes", type=int, default=2, help="receiver --commit-lanes")
    ap.add_argument("--lookup", action="store_true", help="also part 2 (1M and 10M spans)")
    ap.add_argument("--lookup-sizes", default="1000000,10000000")
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cpus, "
        f"python {platform.python_version()}, load {os.getloadavg()[0]:.2f}"
    )
    base = Path(tempfile.mkdtemp(prefix="otelspans-bench-"))
    base.chmod(0o755)  # the cluster runs as the postgres user
    cluster = LocalCluster(base / "pg")
    cluster.init([])
    cluster.start()
    try:
        per_span = part1(cluster, base, args)
        if args.lookup:
            print(f"trace lookup, warm medians ({per_span:.2f} index rows per span):")
            for n in (int(x) for x in args.lookup_sizes.split(",")):
                name = f"lookup_{uuid.uuid4().hex[:8]}"
                with psycopg.connect(cluster.dsn(), autocommit=True) as c:
                    c.execute(f"CREATE DATABASE {name}")
                lookup_at(cluster.dsn(name), n, args.batch, per_span)
    finally:
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
