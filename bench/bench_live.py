"""Live benchmark: a dashboard query during steady ingestion, with and without the follower.

On a throwaway cluster with the extension: a real receiver (``otelspans serve``) takes
``--rate`` spans/s of demo traffic over ``--processes`` processes for ``--seconds`` seconds
(pre-encoded OTLP/HTTP requests, one per process and second, span times = the second they
are sent in), while ``otelspans materialise --follow`` runs beside it (``--no-follower``: the
scans do all the materialisation, as before).  Every ``--every`` seconds a dashboard query
runs (per-service p95 duration over the last 15 minutes, every process); its latency is
compared with the same query on the same store at rest (ingestion stopped, everything
materialised).  Before each dashboard query the follower's lag is read: the age of the oldest
block no partition covers yet.

    PYTHONPATH=. /opt/otelspans/venv/bin/python bench/bench_live.py --rate 20000 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest import start_receiver
from bench_spans import bench_database

from otelspans_fdw.ingest import demo
from otelspans_fdw.ingest.decode import decode_request

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = (
    "SELECT service_name, percentile_cont(0.95) WITHIN GROUP (ORDER BY duration), count(*)"
    " FROM otel_spans WHERE start_time >= now() - interval '15 minutes' GROUP BY 1"
)
# Age of the oldest block of a stale partition that its partition does not cover.
LAG = """
SELECT coalesce(extract(epoch FROM now() - min(b.insert_time)), 0)
FROM otel_block_hours h
LEFT JOIN otel_partitions p ON p.process_id = h.process_id AND p.hour = h.hour
JOIN otel_blocks b ON b.process_id = h.process_id
 AND b.insert_time >= h.hour AND b.insert_time < h.hour + interval '1 hour'
WHERE h.hour >= now() - interval '2 hours'
  AND (p.process_id IS NULL OR p.nb_blocks <> h.nb_blocks OR p.block_checksum <> h.block_checksum)
  AND (p.block_ids IS NULL OR NOT b.block_id = ANY(p.block_ids))
"""


def encode(rate: int, processes: int, seconds: int, t0_ns: int) -> list[list[bytes]]:
    """Per second, the requests of that second (about ``rate`` spans, one request per process
    that has spans in it)."""
    model = demo.TraceModel(seed=5, processes=processes, base_time_ns=t0_ns)
    out = []
    for s in range(seconds):
        model.clock = t0_ns + s * 10**9
        out.append(demo.encode_requests(model, rate, 100_000))
    return out


def send(port: int, slots: list[list[bytes]], start: float, done: list[int]) -> None:
    """Send each second's requests at that second (or as soon after as the receiver allows)."""
    for i, bodies in enumerate(slots):
        delay = start + i - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        counts = [decode_request(b).nb_spans for b in bodies]
        sent, failed = asyncio.run(
            demo.send_raw(
                bodies,
                counts,
                protocol="http",
                endpoint=f"127.0.0.1:{port}",
                concurrency=4,
                token=None,
                progress=demo.Progress(sum(counts), enabled=False),
            )
        )
        done[0] += sent
        done[1] += failed


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=int, default=20_000, help="spans per second")
    ap.add_argument("--processes", type=int, default=200)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--every", type=float, default=5.0, help="seconds between dashboard queries")
    ap.add_argument("--no-follower", action="store_true")
    ap.add_argument("--max-cpu", default="0.5", help="the follower's --max-cpu")
    args = ap.parse_args()

    cluster, store, dsn, conn = bench_database("otelspans-bench-live-")
    receiver = follower = None
    try:
        print(
            f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cpus,"
            f" python {platform.python_version()}, load {os.getloadavg()[0]:.2f}"
        )
        t = time.perf_counter()
        t0_ns = time.time_ns() + 20 * 10**9  # encoding takes a while: start in the future
        slots = encode(args.rate, args.processes, args.seconds, t0_ns)
        print(
            f"pre-encoded {sum(map(len, slots)):,} requests for {args.seconds} s at"
            f" {args.rate:,} spans/s over {args.processes} processes"
            f" ({time.perf_counter() - t:.1f} s)"
        )
        receiver, hport, _ = start_receiver(dsn, store.dir, ["--no-fsync"])
        if not args.no_follower:
            follower = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "otelspans_fdw.cli",
                    "materialise",
                    "--dsn",
                    dsn,
                    "--store",
                    store.url,
                    "--follow",
                    "--interval",
                    "1",
                    "--max-cpu",
                    args.max_cpu,
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
            )
        wait = (t0_ns - time.time_ns()) / 1e9
        if wait > 0:
            time.sleep(wait)
        done = [0, 0]
        start = time.monotonic()
        sender = threading.Thread(target=send, args=(hport, slots, start, done))
        sender.start()
        live: list[float] = []
        lags: list[float] = []
        time.sleep(args.every)
        while sender.is_alive():
            lags.append(float(conn.execute(LAG).fetchone()[0]))
            q = time.perf_counter()
            conn.execute(DASHBOARD).fetchall()
            live.append(time.perf_counter() - q)
            time.sleep(max(0.0, args.every - (time.perf_counter() - q)))
        sender.join()
        took = time.monotonic() - start
        print(
            f"sent {done[0]:,} spans in {took:.1f} s ({done[0] / took:,.0f} spans/s),"
            f" {done[1]} failed requests"
        )
        if follower is not None:
            follower.send_signal(signal.SIGTERM)
            follower.wait(timeout=60)
            follower = None
        conn.execute(DASHBOARD).fetchall()  # materialise what is left
        rest = []
        for _ in range(max(5, len(live))):
            q = time.perf_counter()
            conn.execute(DASHBOARD).fetchall()
            rest.append(time.perf_counter() - q)
        p50, p95 = statistics.median(live), pct(live, 0.95)
        r50, r95 = statistics.median(rest), pct(rest, 0.95)
        mode = "without follower" if args.no_follower else f"follower --max-cpu {args.max_cpu}"
        print()
        print(f"| dashboard query ({mode}) | p50 | p95 |")
        print("| --- | ---: | ---: |")
        print(
            f"| during ingestion ({len(live)} queries) | {p50 * 1000:.0f} ms"
            f" | {p95 * 1000:.0f} ms |"
        )
        print(f"| at rest ({len(rest)} queries) | {r50 * 1000:.0f} ms | {r95 * 1000:.0f} ms |")
        print(f"| ratio | x{p50 / r50:.2f} | x{p95 / r95:.2f} |")
        if lags:
            print(
                "| lag before each query (oldest uncovered block)"
                f" | {statistics.median(lags):.1f} s"
                f" | max {max(lags):.1f} s |"
            )
        conn.close()
    finally:
        for p in (follower, receiver):
            if p is not None:
                p.terminate()
                p.wait(timeout=30)
        cluster.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
