"""Peak backend memory of cold materialisation and of a warm ``SELECT *`` through a cursor.

For each size (spans in one process-hour) a throwaway cluster gets that many spans of one
process written as blocks of 2,000 spans through the ingestion code.  Then, each in a fresh
backend whose peak resident set is read from ``/proc/<pid>/status`` (``VmHWM``; ``VmRSS`` after
the query shows what the idle backend still holds):

* **cold**: ``SELECT count(*) FROM otel_spans WHERE process_id = ...`` with nothing
  materialised (decode every block, sort, write the partition file);
* **warm**: ``SELECT *`` of the same process through a server-side cursor, 10,000 rows per
  ``FETCH``, the partition already built.

The figures are compared with the same backend's figures after ``SELECT 1`` (the baseline:
interpreter and imports).  ``--tree DIR`` measures another checkout's ``otelspans_fdw`` (say
the tree before a change) with the same data and extension.

    PYTHONPATH=. /opt/otelspans/venv/bin/python bench/bench_memory.py --sizes 1000000,5000000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from otelspans_fdw import db
from otelspans_fdw.devcluster import LocalCluster
from otelspans_fdw.ingest.decode import split_blocks
from otelspans_fdw.ingest.metadata import write_blocks
from otelspans_fdw.objstore import LocalStore

ROOT = Path(__file__).resolve().parent.parent
HOUR_NS = 3600 * 10**9
BASE_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z
BLOCK = 2000


def _kv(k: str, v: object) -> KeyValue:
    if isinstance(v, int):
        return KeyValue(key=k, value=AnyValue(int_value=v))
    return KeyValue(key=k, value=AnyValue(string_value=str(v)))


def ingest(dsn: str, store: LocalStore, n: int) -> uuid.UUID:
    """``n`` spans of one process in one hour (typical HTTP server spans, a few attributes)."""
    pid = None
    step = HOUR_NS // max(1, n)
    with psycopg.connect(dsn) as c:
        for first in range(0, n, BLOCK):
            req = ExportTraceServiceRequest()
            rs = req.resource_spans.add()
            rs.resource.attributes.extend(
                [_kv("service.name", "memory"), _kv("process.pid", 42), _kv("host.name", "h1")]
            )
            ss = rs.scope_spans.add()
            ss.scope.name = "bench.memory"
            for i in range(first, min(n, first + BLOCK)):
                s = ss.spans.add()
                s.trace_id = (i // 8 + 1).to_bytes(16, "big")
                s.span_id = (i + 1).to_bytes(8, "big")
                if i % 8:
                    s.parent_span_id = (i - i % 8 + 1).to_bytes(8, "big")
                s.name = f"GET /api/items/{i % 50}"
                s.kind = 2
                s.start_time_unix_nano = BASE_NS + i * step
                s.end_time_unix_nano = BASE_NS + i * step + 1_000_000 + (i % 997) * 1000
                s.attributes.extend(
                    [
                        _kv("http.method", "GET"),
                        _kv("http.route", f"/api/items/{i % 50}"),
                        _kv("http.status_code", 200 if i % 13 else 500),
                        _kv("request.id", f"req-{i:012d}"),
                    ]
                )
            blocks = split_blocks(req).blocks
            for b in blocks:
                store.put_if_absent(b.object_path, b.payload)
                pid = b.process.process_id
            write_blocks(c, blocks)
        c.execute("UPDATE otel_blocks SET insert_time = %s::timestamptz", ("2026-01-01 00:30Z",))
    assert pid is not None
    return pid


def _status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS of a process, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS"):
            out[k] = int(v.split()[0]) // 1024
    return out


def measure(dsn: str, pid: uuid.UUID, warm: bool) -> dict[str, float]:
    with psycopg.connect(dsn, autocommit=True) as c:
        backend = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        c.execute("SELECT count(*) FROM otel_spans WHERE process_id = %s", (uuid.UUID(int=1),))
        base = _status(backend)
        t = time.perf_counter()
        if warm:
            rows = 0
            with c.transaction(), c.cursor(name="all") as cur:
                cur.itersize = 10_000
                cur.execute("SELECT * FROM otel_spans WHERE process_id = %s", (pid,))
                for _ in cur:
                    rows += 1
        else:
            rows = c.execute(
                "SELECT count(*) FROM otel_spans WHERE process_id = %s", (pid,)
            ).fetchone()[0]
        secs = time.perf_counter() - t
        after = _status(backend)
    return {
        "rows": rows,
        "seconds": secs,
        "base_rss": base["VmRSS"],
        "peak": after["VmHWM"],
        "idle_after": after["VmRSS"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000", help="spans per process-hour, comma-separated")
    ap.add_argument("--tree", type=Path, default=ROOT, help="checkout whose package is measured")
    args = ap.parse_args()
    print(f"tree: {args.tree}")
    print("| spans | query | rows | seconds | backend RSS before | peak (VmHWM) | idle after |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for n in [int(x) for x in args.sizes.split(",")]:
        base = Path(tempfile.mkdtemp(prefix="otelspans-mem-"))
        base.chmod(0o755)
        cluster = LocalCluster(base / "pg")
        cluster.init([args.tree / "otelspans_fdw"])
        cluster.start()
        try:
            store_dir = base / "store"
            store_dir.mkdir()
            store_dir.chmod(0o777)
            with psycopg.connect(cluster.dsn(), autocommit=True) as c:
                c.execute("CREATE DATABASE bench")
            dsn = cluster.dsn("bench")
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("CREATE EXTENSION IF NOT EXISTS otelspans")
                c.execute(f"ALTER SERVER otel_spans_server OPTIONS (ADD store '{store_dir}')")
                c.execute(
                    "ALTER SERVER otel_spans_server OPTIONS (ADD max_stale_spans '100000000')"
                )
                db.migrate(c)
            store = LocalStore(store_dir, durable=False)
            t = time.perf_counter()
            pid = ingest(dsn, store, n)
            print(f"<!-- ingested {n} spans in {time.perf_counter() - t:.1f} s -->", flush=True)
            for warm in (False, True):
                m = measure(dsn, pid, warm)
                print(
                    f"| {n:,} | {'warm SELECT * (cursor)' if warm else 'cold materialisation'} "
                    f"| {m['rows']:,} | {m['seconds']:.1f} | {m['base_rss']} MiB "
                    f"| **{m['peak']} MiB** | {m['idle_after']} MiB |",
                    flush=True,
                )
        finally:
            cluster.destroy()
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
