"""Cold materialisation of otel_spans (issue 4): where the time goes, and old vs new code.

Same data as ``bench_spans.py`` (demo traffic written as blocks through the ingestion code into a
throwaway cluster).  Then, all in the same run:

1. **Stages, in this process**, over every partition (process, insert hour): reading the
   payloads, decoding them (this tree's ``decode_blocks``, one call per partition, and, with
   ``--baseline``, the baseline's ``decode_block`` per block), sorting, Parquet serialisation,
   the durable store write; then the whole refresh (``refresh_partitions``, which adds the
   metadata queries and the index transaction).
2. **Through SQL**: every process scanned once with everything stale, in a new backend, with
   this tree's package and (``--baseline``) the baseline package installed alternately in the
   cluster's ``pylib``, ``--rounds`` times each.  The backend's first query (Python imports)
   is timed apart.

``--baseline DIR``: a directory holding an ``otelspans_fdw`` package to compare with (for
example this tree with the previous ``lake/`` files).

    PYTHONPATH=. /opt/otelspans/venv/bin/python bench/bench_materialise.py --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_spans import bench_database, ingest

from otelspans_fdw.devcluster import LocalCluster
from otelspans_fdw.lake import parquet, partitions, refresh
from otelspans_fdw.lake.decode import BlockInfo, decode_blocks
from otelspans_fdw.objstore import LocalStore
from otelspans_fdw.quals import TimeWindow
from otelspans_fdw.schema import SORT_COLUMN

ROOT = Path(__file__).resolve().parent.parent
LAKE_TABLES = ("otel_partition_files", "otel_partitions", "otel_retired_files", "otel_block_errors")


def load_baseline_decode(base: Path) -> Any:
    """The baseline's ``lake/decode.py`` as a module (its imports resolve to this tree)."""
    spec = importlib.util.spec_from_file_location(
        "baseline_decode", base / "otelspans_fdw" / "lake" / "decode.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def reset_lake(conn: psycopg.Connection, store_dir: Path) -> None:
    """Forget every partition: the next scans find everything stale."""
    for t in LAKE_TABLES:
        conn.execute(f"DELETE FROM {t}")
    shutil.rmtree(store_dir / "views", ignore_errors=True)


def partitions_of(conn: psycopg.Connection) -> list[tuple[uuid.UUID, list[Any]]]:
    """(process, blocks) of every partition, as a refresh would see them."""
    out = []
    for pid, hour in conn.execute(
        "SELECT DISTINCT process_id, date_bin('1 hour', insert_time, 'epoch') FROM otel_blocks"
        " ORDER BY 1, 2"
    ):
        out.append((pid, partitions.hour_blocks(conn, pid, hour)))
    return out


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t


def timed_cpu(fn: Callable[[], Any]) -> tuple[Any, tuple[float, float]]:
    """(result, (wall seconds, CPU seconds of this process))."""
    t, c = time.perf_counter(), time.process_time()
    r = fn()
    return r, (time.perf_counter() - t, time.process_time() - c)


def stages(
    conn: psycopg.Connection, store: LocalStore, base_decode: Any, scratch: Path
) -> tuple[int, dict[str, tuple[float, float]]]:
    """Seconds per stage over all partitions (in this process, no SQL around the refresh)."""
    parts = partitions_of(conn)
    res: dict[str, tuple[float, float]] = {}

    def add(k: str, secs: tuple[float, float]) -> None:
        w, c = res.get(k, (0.0, 0.0))
        res[k] = (w + secs[0], c + secs[1])

    durable = LocalStore(scratch, durable=True)
    rows = 0
    for pid, blocks in parts:
        payloads, secs = timed_cpu(lambda blocks=blocks: [store.get(b.object_path) for b in blocks])
        add("read payloads", secs)
        items = [
            (p, BlockInfo(pid, b.stream_id, b.block_id, b.insert_time, "ns/x", "app", "h", "{}"))
            for p, b in zip(payloads, blocks, strict=True)
        ]
        got, secs = timed_cpu(lambda items=items: decode_blocks(items))
        add("decode (this tree, per partition)", secs)
        table = got.table
        rows += table.num_rows
        if base_decode is not None:
            old, secs = timed_cpu(
                lambda items=items: pa.concat_tables(
                    [base_decode.decode_block(p, i) for p, i in items]
                )
            )
            add("decode (baseline, per block)", secs)
            assert old.num_rows == table.num_rows
        table, secs = timed_cpu(lambda table=table: table.sort_by(SORT_COLUMN))
        add("sort", secs)

        def serialise(table: pa.Table = table) -> bytes:
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, **parquet.WRITE_OPTIONS)
            return sink.getvalue().to_pybytes()

        data, secs = timed_cpu(serialise)
        add("parquet serialisation", secs)
        _, secs = timed_cpu(lambda data=data: durable.put_if_absent(f"x/{uuid.uuid4()}", data))
        add("durable store write", secs)
    return rows, res


def refresh_all(conn: psycopg.Connection, store: LocalStore) -> tuple[int, float]:
    """Every partition refreshed in this process, as the scans would; (rows, seconds)."""
    pids = [r[0] for r in conn.execute("SELECT DISTINCT process_id FROM otel_blocks")]
    t = time.perf_counter()
    rows = 0
    for pid in pids:
        states = partitions.partition_states(conn, [pid], TimeWindow())
        rows += refresh.refresh_partitions(conn, store, states).rows_written
    return rows, time.perf_counter() - t


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (from /proc: robust to a busy machine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sql_cold(
    cluster: LocalCluster, dsn: str, pkg: Path, pids: list[uuid.UUID], store_dir: Path
) -> tuple[int, float, float, float]:
    """(rows, seconds, backend CPU seconds, first-query seconds): all processes scanned stale
    by a new backend."""
    cluster.sync_python([pkg])
    with psycopg.connect(dsn, autocommit=True) as c:
        reset_lake(c, store_dir)
    with psycopg.connect(dsn, autocommit=True) as c:
        backend = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        q = "SELECT count(*) FROM otel_spans WHERE process_id = %s"
        _, first = timed(lambda: c.execute(q, (uuid.UUID(int=0),)).fetchone())
        cpu = cpu_seconds(backend)
        t = time.perf_counter()
        rows = sum(c.execute(q, (pid,)).fetchone()[0] for pid in pids)
        secs = time.perf_counter() - t
        return rows, secs, cpu_seconds(backend) - cpu, first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--hours", type=int, default=6)
    ap.add_argument("--spans-per-hour", type=int, default=40_000, help="all processes")
    ap.add_argument("--rounds", type=int, default=3, help="SQL runs per variant")
    ap.add_argument("--baseline", type=Path, help="directory holding a baseline otelspans_fdw")
    args = ap.parse_args()

    cluster, store, dsn, conn = bench_database("otelspans-bench-mat-")
    store_dir = Path(store.root)
    base = store_dir.parent
    try:
        partitions.ensure_schema(conn)
        payloads = ingest(
            dsn,
            store,
            seed=42,
            processes=args.processes,
            hours=args.hours,
            per_hour=args.spans_per_hour,
        )
        total = conn.execute("SELECT sum(nb_spans - nb_rejected) FROM otel_blocks").fetchone()[0]
        nparts = conn.execute(
            "SELECT count(DISTINCT (process_id, date_bin('1 hour', insert_time, 'epoch')))"
            " FROM otel_blocks"
        ).fetchone()[0]
        print(
            f"{total:,} spans in {len(payloads)} blocks ({sum(map(len, payloads)) / 1e6:.1f} MB),"
            f" {nparts} partitions; {len(os.sched_getaffinity(0))} cpus,"
            f" load {os.getloadavg()[0]:.2f}"
        )
        base_decode = load_baseline_decode(args.baseline) if args.baseline else None

        rows, st = stages(conn, store, base_decode, base / "scratch")
        print("\n| stage (in this process, all partitions) | wall s | CPU s | spans/CPU-s |")
        print("| --- | ---: | ---: | ---: |")
        for k, (w, c) in st.items():
            print(
                f"| {k} | {w:.3f} | {c:.3f} | {rows / c:,.0f} |"
                if c
                else f"| {k} | {w:.3f} | 0 | |"
            )
        reset_lake(conn, store_dir)
        durable = LocalStore(store_dir, durable=True)
        (written, secs), (_, cpu) = timed_cpu(lambda: refresh_all(conn, durable))
        print(
            f"| whole refresh (refresh_partitions, durable store) | {secs:.3f} | {cpu:.3f} |"
            f" {written / cpu:,.0f} |"
        )

        pids = [
            r[0]
            for r in conn.execute(
                "SELECT process_id FROM otel_blocks GROUP BY 1 ORDER BY sum(nb_spans) DESC"
            )
        ]
        variants = [("this tree", ROOT / "otelspans_fdw")]
        if args.baseline:
            variants.insert(0, ("baseline", args.baseline / "otelspans_fdw"))
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _ in variants}
        for _ in range(args.rounds):
            for name, pkg in variants:
                got, secs, cpu, first = sql_cold(cluster, dsn, pkg, pids, store_dir)
                assert got == total, (got, total)
                results[name].append((secs, cpu, first))
        print(
            "\n| cold materialisation via SQL | wall best (median) | spans/s wall |"
            " backend CPU best | spans/CPU-s | first query |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, rs in results.items():
            secs, cpus = [r[0] for r in rs], [r[1] for r in rs]
            print(
                f"| {name} | {min(secs):.2f} s ({statistics.median(secs):.2f} s) |"
                f" {total / min(secs):,.0f} | {min(cpus):.2f} s | {total / min(cpus):,.0f} |"
                f" {statistics.median(r[2] for r in rs):.2f} s |"
            )
        if args.baseline:
            wall = min(r[0] for r in results["baseline"]) / min(r[0] for r in results["this tree"])
            cpu = min(r[1] for r in results["baseline"]) / min(r[1] for r in results["this tree"])
            print(f"\nspeed-up, same run: wall {wall:.2f}x, backend CPU {cpu:.2f}x")
        conn.close()
    finally:
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
