"""Ingestion benchmark (issue 3): OTLP/HTTP protobuf and OTLP/gRPC into a real receiver.

Starts a throwaway PostgreSQL cluster and an ``otelspans serve`` subprocess per protocol (each
on a fresh database and store), pre-encodes ``--spans`` spans of demo traffic in requests of
``--batch`` spans (one process per request, like an SDK batch), sends them from ``--concurrency``
concurrent clients, checks that every span is in the metadata, and prints spans/s and the
receiver's peak RSS (VmHWM).

    /opt/otelspans/venv/bin/python bench/bench_ingest.py --spans 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from otelspans_fdw.devcluster import LocalCluster
from otelspans_fdw.loadgen import send, traffic


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_receiver(dsn: str, store: Path, extra: list[str]) -> tuple[subprocess.Popen, int, int]:
    argv = [
        sys.executable,
        "-m",
        "otelspans_fdw.cli",
        "serve",
        "--dsn",
        dsn,
        "--store",
        str(store),
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        *extra,
    ]
    # cwd = the repository: `-m otelspans_fdw.cli` runs the working tree, not an installed copy.
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    fields = dict(p.split("=") for p in line.split() if "=" in p)
    return proc, int(fields["http"]), int(fields["grpc"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spans", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--protocols", default="http,grpc")
    ap.add_argument("--no-fsync", action="store_true", help="pass --no-fsync to the receiver")
    args = ap.parse_args()

    t = time.monotonic()
    model = traffic.TraceModel(seed=42, processes=8, base_time_ns=1_750_000_000 * 10**9)
    bodies = traffic.encode_requests(model, args.spans, args.batch)
    from otelspans_fdw.ingest.decode import decode_request

    counts = [decode_request(b).nb_spans for b in bodies]
    total = sum(counts)
    mib = sum(map(len, bodies)) / 2**20
    print(
        f"pre-encoded {len(bodies)} requests, {total:,} spans, {mib:.0f} MiB "
        f"in {time.monotonic() - t:.1f} s"
    )
    print(
        f"machine: {platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cpus, "
        f"python {platform.python_version()}, fsync {'off' if args.no_fsync else 'on'}"
    )

    base = Path(tempfile.mkdtemp(prefix="otelspans-bench-"))
    base.chmod(0o755)  # the cluster runs as the postgres user
    cluster = LocalCluster(base / "pg")
    cluster.init([])
    cluster.start()
    try:
        for proto in args.protocols.split(","):
            dbname = f"bench_{proto}"
            with psycopg.connect(cluster.dsn(), autocommit=True) as c:
                c.execute(f"CREATE DATABASE {dbname}")
            extra = ["--no-fsync"] if args.no_fsync else []
            proc, hport, gport = start_receiver(cluster.dsn(dbname), base / f"store-{proto}", extra)
            try:
                endpoint = f"127.0.0.1:{hport}" if proto == "http" else f"127.0.0.1:{gport}"
                prog = send.Progress(total, enabled=sys.stderr.isatty())
                t0 = time.monotonic()
                sent, failed = asyncio.run(
                    send.send_raw(
                        bodies,
                        counts,
                        protocol=proto,
                        endpoint=endpoint,
                        concurrency=args.concurrency,
                        token=None,
                        progress=prog,
                    )
                )
                dt = time.monotonic() - t0
                rss = peak_rss_mib(proc.pid)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            with psycopg.connect(cluster.dsn(dbname)) as c:
                stored, blocks = c.execute(
                    "SELECT sum(nb_spans), count(*) FROM otel_blocks"
                ).fetchone()
            ok = stored == total and failed == 0
            print(
                f"{proto:<5} {sent:>10,} spans in {dt:6.2f} s = {sent / dt:>9,.0f} spans/s "
                f"({len(bodies) / dt:,.0f} req/s, {args.concurrency} clients, "
                f"batch {args.batch}); receiver peak RSS {rss:.0f} MiB; "
                f"stored {stored:,} spans in {blocks:,} blocks {'OK' if ok else 'MISMATCH'}"
            )
            if not ok:
                return 1
    finally:
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
