"""Trace index benchmark (issue 6): its ingestion cost, and index vs per-block bloom filters.

Part 0 (``--candidates``): the index designs considered, each replayed on the same decoded demo
blocks through one connection, ``--per-tx`` blocks per transaction as group commit does; per
block: time inside the acknowledged transactions, their p99, and the CPU of this process and
the backends (merges included), best of ``--rounds``.  Isolates the database side, which the
end-to-end ratio of part 1 only shows through the noise of a shared machine.

Part 1 (always, unless ``--skip-ingest``): the same pre-encoded demo traffic (requests of
``--batch`` spans, one process per request) is sent over OTLP/HTTP to ``otelspans serve`` with
the trace index on and with ``--no-trace-index``, alternating for ``--rounds`` rounds, each run
on a fresh database and store; prints spans/s of every run, the best of each mode and their
ratio, and the index's rows, ids and bytes.

Part 2 (``--lookup``): what a trace-by-id lookup costs in the two designs at the sizes of the
issue's goals (1M and 10M spans), on synthetic metadata shaped like part 1's (blocks of
``--batch`` spans, the measured distinct-traces-per-block ratio):
(a) ``otel_trace_blocks`` + its GIN, through
:func:`otelspans_fdw.lake.trace_index.blocks_for_traces`,
with its pending list merged, one receiver merge interval pending, and near its cap;
(b) one bloom filter per block (1% false positives, k=7) scanned with ``get_bit``.
Prints warm median latencies and, for (b), the false-positive blocks a lookup drags in.

    /opt/otelspans/venv/bin/python bench/bench_trace_index.py --spans 1000000 --rounds 3 \
        --lookup --candidates
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
import struct
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
from otelspans_fdw.ingest.decode import Block, decode_request  # noqa: E402
from otelspans_fdw.ingest.metadata import (  # noqa: E402
    SQL_BLOCKS,
    SQL_PROCESSES,
    SQL_STREAMS,
    SQL_TRACE_COPY,
    batch_params,
    trace_copy_data,
)
from otelspans_fdw.lake.trace_index import blocks_for_traces  # noqa: E402
from otelspans_fdw.loadgen import send, traffic  # noqa: E402

# --- part 0 (``--candidates``): index designs replayed through one connection ------------------

_LEN16 = struct.pack(">i", 16)


def _copy(cur: psycopg.Cursor, table: str, rows: list[bytes]) -> None:
    """One binary COPY of pre-built rows (header, rows, trailer)."""
    if rows:
        data = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8 + b"".join(rows) + b"\xff\xff"
        with cur.copy(f"COPY {table} FROM STDIN (FORMAT BINARY)") as cp:
            cp.write(data)


def _field(b: bytes) -> bytes:
    return struct.pack(">i", len(b)) + b


def _array(oid: int, elem_len: int, elems: list[bytes]) -> bytes:
    """A one-dimensional binary array of fixed-length elements."""
    head = struct.pack(">iiiiii", 1, 0, oid, len(elems), 1, elem_len)
    return head + struct.pack(">i", elem_len).join(elems)


def _w_rows5(cur: psycopg.Cursor, blocks: list[Block]) -> None:
    """(b0) the previous design: a (trace, block, process, begin, end) row per trace."""
    data = trace_rows5(blocks)
    if data:
        with cur.copy("COPY tb FROM STDIN (FORMAT BINARY)") as cp:
            cp.write(data)


def trace_rows5(blocks: list[Block]) -> bytes | None:
    row = struct.Struct(">hi16s44sqiq")
    epoch = 946_684_800_000_000  # 2000-01-01 in Unix microseconds
    parts = []
    for b in blocks:
        mid = _LEN16 + b.block_id.bytes + _LEN16 + b.process.process_id.bytes + b"\0\0\0\x08"
        parts += [
            row.pack(5, 16, t, mid, s // 1000 - epoch, 8, e // 1000 - epoch)
            for t, (s, e) in b.traces.items()
        ]
    return b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8 + b"".join(parts) + b"\xff\xff" if parts else None


def _w_rows2(cur: psycopg.Cursor, blocks: list[Block]) -> None:
    """(b1) narrow rows: (trace_id, block_id) per trace, nothing else."""
    rows = []
    for b in blocks:
        tail = _LEN16 + b.block_id.bytes
        rows += [b"\x00\x02" + _LEN16 + t + tail for t in b.traces]
    _copy(cur, "tb", rows)


def _w_gin_int8(cur: psycopg.Cursor, blocks: list[Block]) -> None:
    """(a0) one row per block: uuid[] + bounds as two int8[]."""
    rows = []
    for b in blocks:
        be = [struct.pack(">q", t // 1000) for t, _ in b.traces.values()]
        en = [struct.pack(">q", t // 1000) for _, t in b.traces.values()]
        rows.append(
            b"\x00\x04"
            + _field(b.block_id.bytes)
            + _field(_array(2950, 16, list(b.traces)))
            + _field(_array(20, 8, be))
            + _field(_array(20, 8, en))
        )
    _copy(cur, "tb", rows)


def _w_gin_bytea(cur: psycopg.Cursor, blocks: list[Block]) -> None:
    """(a1..a4) one row per block: uuid[] + packed bounds (the chosen row format)."""
    data = trace_copy_data(blocks, {b.block_id for b in blocks})
    if data is not None:
        with cur.copy(SQL_TRACE_COPY.replace("otel_trace_blocks", "tb")) as cp:
            cp.write(data[0])


def _w_staging(cur: psycopg.Cursor, blocks: list[Block]) -> None:
    """(c) deferred: only what the acknowledged transaction would write, a packed staging row
    per block; expanding it into an index later is not counted (a lower bound for (c))."""
    rows = []
    for b in blocks:
        packed = b"".join(t + struct.pack(">qq", s, e) for t, (s, e) in b.traces.items())
        rows.append(b"\x00\x02" + _field(b.block_id.bytes) + _field(packed))
    _copy(cur, "tb", rows)


_GIN = (
    "CREATE TABLE tb (block_id uuid PRIMARY KEY, trace_ids uuid[] NOT NULL, bounds bytea NOT NULL);"
    " ALTER TABLE tb ALTER trace_ids SET STORAGE {st}, ALTER bounds SET STORAGE {st};"
    " CREATE INDEX tb_gin ON tb USING gin (trace_ids) WITH ({opts});"
)
#: name -> (DDL, writer, merge every N ids on a second connection (0: never))
CANDIDATES: dict[str, tuple[str, Callable[[psycopg.Cursor, list[Block]], None] | None, int]] = {
    "none (no index)": ("", None, 0),
    "(b0) row per trace, 5 cols, B-tree [previous]": (
        "CREATE TABLE tb (trace_id uuid NOT NULL, block_id uuid NOT NULL, process_id uuid NOT NULL,"
        " begin_time timestamptz NOT NULL, end_time timestamptz NOT NULL);"
        " CREATE INDEX ON tb (trace_id)",
        _w_rows5,
        0,
    ),
    "(b1) row per trace, (trace_id, block_id), B-tree": (
        "CREATE TABLE tb (trace_id uuid NOT NULL, block_id uuid NOT NULL);"
        " CREATE INDEX ON tb (trace_id)",
        _w_rows2,
        0,
    ),
    "(a0) row per block, uuid[] GIN + 2 int8[]": (
        "CREATE TABLE tb (block_id uuid PRIMARY KEY, trace_ids uuid[] NOT NULL,"
        " begins int8[] NOT NULL, ends int8[] NOT NULL);"
        " CREATE INDEX ON tb USING gin (trace_ids)",
        _w_gin_int8,
        0,
    ),
    "(a1) row per block, uuid[] GIN + bytea, fastupdate off": (
        _GIN.format(st="EXTERNAL", opts="fastupdate = off"),
        _w_gin_bytea,
        0,
    ),
    "(a2) row per block, uuid[] GIN + bytea, STORAGE MAIN": (
        _GIN.format(st="MAIN", opts="fastupdate = on"),
        _w_gin_bytea,
        0,
    ),
    "(a3) row per block, uuid[] GIN + bytea, EXTERNAL, 4 MB pending": (
        _GIN.format(st="EXTERNAL", opts="fastupdate = on"),
        _w_gin_bytea,
        0,
    ),
    "(a4) = a3, 16 MB pending, merged aside every 16k ids [chosen]": (
        _GIN.format(st="EXTERNAL", opts="fastupdate = on, gin_pending_list_limit = 16384"),
        _w_gin_bytea,
        16_384,
    ),
    "(c) deferred: staging row per block, no index (ack path only)": (
        "CREATE TABLE tb (block_id uuid PRIMARY KEY, ids bytea NOT NULL);"
        " ALTER TABLE tb ALTER ids SET STORAGE EXTERNAL",
        _w_staging,
        0,
    ),
}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a local process (a PostgreSQL backend)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def candidate_run(
    dsn: str, name: str, blocks: list[Block], per_tx: int
) -> tuple[float, float, float, float]:
    """Write ``blocks`` as the receiver does (``per_tx`` per transaction) with one candidate.

    Returns per block: mean ms inside the acknowledged transactions, their p99 (per
    transaction), total CPU ms (this process + both backends: merges included) and bytes.
    """
    ddl, writer, merge_every = CANDIDATES[name]
    with psycopg.connect(dsn, autocommit=True) as c, psycopg.connect(dsn, autocommit=True) as m:
        c.execute(db.MIGRATIONS[0][1])
        if ddl:
            c.execute(ddl)
        pids = (c.info.backend_pid, m.info.backend_pid)
        cpu0 = time.process_time() + sum(_cpu_s(p) for p in pids)
        tx: list[float] = []
        unmerged = 0
        for i in range(0, len(blocks), per_tx):
            bl = blocks[i : i + per_tx]
            pp, sp, bp = batch_params(bl)
            t = time.perf_counter()
            with c.transaction(), c.cursor() as cur:
                cur.execute(SQL_PROCESSES, pp)
                cur.execute(SQL_STREAMS, sp)
                cur.execute(SQL_BLOCKS, bp)
                if writer is not None:
                    writer(cur, bl)
            tx.append(time.perf_counter() - t)
            unmerged += sum(len(b.traces) for b in bl)
            if merge_every and unmerged >= merge_every:
                m.execute("SELECT gin_clean_pending_list('tb_gin'::regclass)")
                unmerged = 0
        cpu = time.process_time() + sum(_cpu_s(p) for p in pids) - cpu0
        size = c.execute(
            "SELECT coalesce(pg_total_relation_size(to_regclass('tb')), 0)"
        ).fetchone()[0]
    n = len(blocks)
    p99 = sorted(tx)[int(len(tx) * 0.99)]
    return sum(tx) / n * 1000, p99 * 1000, cpu / n * 1000, size / n


def part0(cluster: LocalCluster, args: argparse.Namespace) -> None:
    """Every candidate on the same decoded blocks, ``--rounds`` times, best of each."""
    model = traffic.TraceModel(seed=42, processes=8, base_time_ns=1_750_000_000 * 10**9)
    bodies = traffic.encode_requests(model, args.candidate_spans, args.batch)
    blocks = [b for body in bodies for b in decode_request(body).blocks]
    print(
        f"candidates: {len(blocks):,} blocks of {args.batch} spans written by one connection, "
        f"{args.per_tx} blocks per transaction, best of {args.rounds} (ms and bytes per block):"
    )
    best: dict[str, list[float]] = {}
    for rnd in range(args.rounds):
        for i, name in enumerate(CANDIDATES):
            db_name = f"cand_{rnd}_{i}"
            with psycopg.connect(cluster.dsn(), autocommit=True) as c:
                c.execute(f"CREATE DATABASE {db_name}")
            r = candidate_run(cluster.dsn(db_name), name, blocks, args.per_tx)
            old = best.get(name)
            best[name] = (
                list(r) if old is None else [min(a, b) for a, b in zip(old, r, strict=True)]
            )
    base_tx, _, base_cpu, _ = best["none (no index)"]
    for name, (tx, p99, cpu, size) in best.items():
        print(
            f"  {name:64s} tx {tx:5.2f} ms (+{tx - base_tx:4.2f}), p99 tx {p99:5.1f} ms, "
            f"CPU {cpu:5.2f} ms (+{cpu - base_cpu:4.2f}), {size / 1024:5.1f} KiB",
            flush=True,
        )


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
            send.send_raw(
                bodies,
                counts,
                protocol="http",
                endpoint=f"127.0.0.1:{hport}",
                concurrency=concurrency,
                token=None,
                progress=send.Progress(sum(counts), enabled=False),
            )
        )
        dt = time.monotonic() - t0
        rss = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    with psycopg.connect(cluster.dsn(name)) as c:
        stored, blocks = c.execute("SELECT sum(nb_spans), count(*) FROM otel_blocks").fetchone()
        rows, ids, size = c.execute(
            "SELECT count(*), coalesce(sum(cardinality(trace_ids)), 0),"
            " pg_total_relation_size('otel_trace_blocks') FROM otel_trace_blocks"
        ).fetchone()
    if failed or stored != sum(counts):
        raise SystemExit(f"{name}: {failed} failed requests, {stored} spans stored")
    if index != (ids > 0) or rows > blocks:
        raise SystemExit(f"{name}: index {'on' if index else 'off'} but {rows} rows, {ids} ids")
    return {
        "spans_s": sent / dt,
        "seconds": dt,
        "rss": rss,
        "blocks": blocks,
        "rows": rows,
        "ids": ids,
        "bytes": size,
    }


def part1(cluster: LocalCluster, base: Path, args: argparse.Namespace) -> float:
    """Index on/off ingestion; returns indexed (trace, block) pairs per span (for part 2)."""
    model = traffic.TraceModel(seed=42, processes=8, base_time_ns=1_750_000_000 * 10**9)
    bodies = traffic.encode_requests(model, args.spans, args.batch)
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
                per_span = r["ids"] / total
                extra = (
                    f"; index {r['rows']:,} rows holding {r['ids']:,} trace ids "
                    f"({per_span:.2f}/span, {r['ids'] / r['blocks']:.0f}/block), "
                    f"{r['bytes'] / 2**20:.0f} MiB "
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


SQL_ADD_BLOCKS = """
WITH nb AS (
    INSERT INTO otel_blocks (block_id, stream_id, process_id, begin_time, end_time,
                             nb_spans, payload_size, object_path)
    SELECT gen_random_uuid(), p, p, t, t, %(batch)s, 0, ''
    FROM generate_series(1, %(n)s) g,
    LATERAL (SELECT ('00000000-0000-0000-0000-' || lpad(to_hex(g %% 8 + 1), 12, '0'))::uuid,
                    now() - g * interval '1 second') AS x(p, t)
    RETURNING block_id, begin_time
)
INSERT INTO otel_trace_blocks (block_id, trace_ids, bounds)
SELECT nb.block_id,
       ARRAY(SELECT gen_random_uuid() FROM generate_series(1, %(per_block)s)
             WHERE nb.block_id IS NOT NULL),
       decode(repeat(encode(int8send(us) || int8send(us + 1000000), 'hex'), %(per_block)s), 'hex')
FROM nb, LATERAL (SELECT (extract(epoch FROM nb.begin_time) * 1000000000)::int8) AS x(us)
"""

SQL_PENDING = (
    "SELECT n_pending_tuples, n_pending_pages * 8192"
    " FROM gin_metapage_info(get_raw_page('otel_trace_blocks_trace', 0))"
)


def lookup_at(dsn: str, spans: int, batch: int, per_span: float) -> None:
    """Build synthetic metadata for ``spans`` spans and time lookups in both designs.

    The trace index is timed with its GIN pending list merged (what the receiver's merges keep
    it close to), then with one merge interval's worth of ids pending (16k, the receiver's
    default), then with the pending list near its 16 MB cap (merges failing: the worst case).
    """
    nblocks = spans // batch
    per_block = max(1, round(per_span * batch))
    bits = 1 << math.ceil(math.log2(per_block * 9.6))  # 1% false positives, power of two
    k = 7
    with psycopg.connect(dsn, autocommit=True) as c:
        db.migrate(c)
        c.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
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
        c.execute(SQL_ADD_BLOCKS, {"batch": batch, "n": nblocks, "per_block": per_block})
        c.execute("SELECT gin_clean_pending_list('otel_trace_blocks_trace'::regclass)")
        c.execute("VACUUM ANALYZE otel_trace_blocks")
        c.execute("ANALYZE otel_blocks")
        # (b): a bloom filter per block at ~50% fill (an optimally sized full filter), k probes.
        c.execute(
            "CREATE TABLE bloom AS SELECT block_id, process_id, decode(string_agg("
            " lpad(to_hex((random() * 4294967295)::bigint), 8, '0'), ''), 'hex') AS f"
            " FROM otel_blocks, generate_series(1, %s) GROUP BY block_id, process_id",
            (bits // 32,),
        )
        build = time.monotonic() - t0
        tids = [r[0].hex for r in c.execute("SELECT trace_ids[1] FROM otel_trace_blocks LIMIT 200")]
        it = iter(tids * 100)
        found: list[int] = []

        def lookup() -> None:
            found.append(len(blocks_for_traces(c, [next(it)])))

        idx_ms = [_timed(lookup, 200)]
        pending = []
        added = 0
        for ids in (16_384, 200_000):  # one merge interval; then close to the 16 MB cap
            n = ids // per_block - added
            added += n
            c.execute(SQL_ADD_BLOCKS, {"batch": batch, "n": n, "per_block": per_block})
            pending.append(c.execute(SQL_PENDING).fetchone())
            idx_ms.append(_timed(lookup, 200))
        if min(found) != 1:
            raise SystemExit(f"a lookup found {min(found)} blocks instead of 1")
        rnd = random.Random(1)
        probes = " AND ".join("get_bit(f, %s) = 1" for _ in range(k))
        sql = f"SELECT block_id, process_id FROM bloom WHERE {probes}"
        fp: list[int] = []

        def bloom() -> None:
            fp.append(len(c.execute(sql, [rnd.randrange(bits) for _ in range(k)]).fetchall()))

        bloom_ms = _timed(bloom, 30)
    print(
        f"  {spans:>12,} spans: {nblocks:,} blocks, {nblocks * per_block:,} indexed ids "
        f"(built in {build:.0f} s); (a) index lookup {idx_ms[0]:.2f} ms merged, "
        + ", ".join(
            f"{ms:.2f} ms with {p[0] * per_block:,} ids pending ({p[1] / 2**20:.1f} MiB)"
            for ms, p in zip(idx_ms[1:], pending, strict=True)
        )
        + f"; (b) bloom scan ({bits} bits/block) {bloom_ms:.1f} ms, "
        f"{statistics.mean(fp):.1f} false-positive blocks per lookup",
        flush=True,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spans", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="on/off pairs, alternating order")
    ap.add_argument("--commit-lanes", type=int, default=2, help="receiver --commit-lanes")
    ap.add_argument("--lookup", action="store_true", help="also part 2 (1M and 10M spans)")
    ap.add_argument("--candidates", action="store_true", help="also part 0 (index designs)")
    ap.add_argument("--candidate-spans", type=int, default=1_000_000)
    ap.add_argument("--per-tx", type=int, default=4, help="part 0: blocks per transaction")
    ap.add_argument("--skip-ingest", action="store_true", help="skip part 1")
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
        if args.candidates:
            part0(cluster, args)
        per_span = 0.31 if args.skip_ingest else part1(cluster, base, args)
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
