"""The per-(process, hour) summaries and background materialisation, over a real PostgreSQL.

Freshness must stay exact with the summaries in place of block reads: every test compares the
summaries with a recomputation from ``otel_blocks`` and the scan results with rows computed
independently from the OTLP messages (tests/spans_helpers.py).  The follower (``otelspans
materialise``) is run as the real command, beside scans, and no partition may be built twice.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from spans_helpers import T0_NS, make_resource_spans, overlapping
from test_lake_refresh import HOUR_A, T0, Env, req

from otelspans_fdw.lake import materialise, retention
from otelspans_fdw.lake.partitions import block_checksum

ROOT = Path(__file__).resolve().parent.parent

# The summaries recomputed from the blocks, the way the partition index defines an hour.
RECOMPUTED = """
SELECT process_id, date_bin('1 hour', insert_time, 'epoch'), count(*),
       array_agg(block_id), sum(nb_spans - nb_rejected)
FROM otel_blocks GROUP BY 1, 2 ORDER BY 1, 2
"""


@pytest.fixture
def env(fresh_dsn: str, tmp_path: Path) -> Iterator[Env]:
    e = Env(fresh_dsn, tmp_path / "store")
    yield e
    e.conn.close()


def assert_summaries_exact(env: Env) -> None:
    want = [
        (r[0], r[1], r[2], block_checksum(r[3]), r[4])
        for r in env.conn.execute(RECOMPUTED).fetchall()
    ]
    got = env.conn.execute(
        "SELECT process_id, hour, nb_blocks, block_checksum, nb_spans FROM otel_block_hours"
        " ORDER BY 1, 2"
    ).fetchall()
    assert [tuple(r) for r in got] == want
    per_process = env.conn.execute(
        "SELECT process_id, count(*), sum(nb_spans - nb_rejected) FROM otel_blocks"
        " GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert env.conn.execute(
        "SELECT process_id, nb_blocks, nb_spans FROM otel_process_blocks ORDER BY 1"
    ).fetchall() == [tuple(r) for r in per_process]


def test_summaries_follow_inserts_updates_and_deletes(env: Env) -> None:
    assert env.one("SELECT count(*) FROM otel_block_hours") == 0
    ids = [
        env.ing.add(make_resource_spans(pid=k % 2, n=10 + k, seed=k), insert_time=HOUR_A)
        for k in range(4)
    ]
    assert_summaries_exact(env)
    assert env.one("SELECT count(*) FROM otel_block_hours") == 2
    # moving a block to another hour (what the benchmarks do to insert times) moves its terms
    env.conn.execute(
        "UPDATE otel_blocks SET insert_time = insert_time + interval '3 hours' WHERE block_id = %s",
        (ids[0],),
    )
    assert_summaries_exact(env)
    env.conn.execute("DELETE FROM otel_blocks WHERE block_id = ANY(%s)", (ids[:2],))
    assert_summaries_exact(env)
    assert env.one("SELECT count(*) FROM otel_block_hours") == 2
    env.conn.execute("DELETE FROM otel_trace_blocks")
    env.conn.execute("DELETE FROM otel_blocks")
    assert env.one("SELECT count(*) FROM otel_block_hours") == 0
    assert env.one("SELECT count(*) FROM otel_process_blocks") == 0


def test_block_committed_during_a_refresh_makes_the_partition_stale(env: Env) -> None:
    """A block whose transaction commits after a refresh read the hour (its insert time is
    inside the hour, its commit later) is not covered; the summary, written by that same
    transaction, says so and the next scan adds it."""
    bid = env.ing.add(make_resource_spans(n=20, seed=1), insert_time=HOUR_A)
    pid = env.pid_of(bid)
    late = make_resource_spans(n=7, seed=2)
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from otelspans_fdw.ingest.decode import decode_request
    from otelspans_fdw.ingest.metadata import write_blocks

    r = ExportTraceServiceRequest()
    r.resource_spans.append(late)
    blocks = decode_request(r.SerializeToString()).blocks
    for b in blocks:
        env.store.put_if_absent(b.object_path, b.payload)
    with psycopg.connect(env.dsn) as writer:
        writer.execute("SELECT 1")  # an open transaction: write_blocks nests in it
        write_blocks(writer, blocks)
        writer.execute(
            "UPDATE otel_blocks SET insert_time = %s WHERE block_id = %s",
            (HOUR_A + dt.timedelta(minutes=59), blocks[0].block_id),
        )
        got, report = env.scan(req([pid]))  # refreshes HOUR_A without the uncommitted block
        assert report.refreshed == 1 and len(got) == 20
        assert env.lake.plan(req([pid])).stale == 0
        writer.commit()
    env.ing.messages.append((blocks[0].block_id, late))
    assert env.lake.plan(req([pid])).stale == 1
    got, report = env.scan(req([pid]))
    assert report.refreshed == 1 and report.blocks_decoded == 1 and len(got) == 27
    assert got == env.ing.expected([pid])
    assert env.one("SELECT count(*) FROM otel_partitions") == 1
    assert_summaries_exact(env)


def test_late_block_into_an_old_hour_and_old_spans_in_a_new_hour(env: Env) -> None:
    bid = env.ing.add(make_resource_spans(n=20, seed=3), insert_time=HOUR_A)
    pid = env.pid_of(bid)
    w = (T0 - dt.timedelta(seconds=1), T0 + dt.timedelta(seconds=100))
    got, report = env.scan(req([pid], *w))
    assert len(got) == 20 and report.stale == 1
    assert env.lake.plan(req([pid], *w)).stale == 0
    # a block inserted late into the old hour (a late commit)
    env.ing.add(make_resource_spans(n=5, seed=5), insert_time=HOUR_A + dt.timedelta(minutes=30))
    assert env.lake.plan(req([pid], *w)).stale == 1
    got, report = env.scan(req([pid], *w))
    assert report.refreshed == 1 and report.blocks_decoded == 1 and len(got) == 25
    # old spans inserted now: a new hour whose bounds reach back to the old window
    env.ing.add(make_resource_spans(n=15, seed=4, base_ns=T0_NS + 10**9))
    got, report = env.scan(req([pid], *w))
    assert report.partitions == 2 and report.refreshed == 1
    assert got == overlapping(env.ing.expected([pid]), *w) and len(got) == 40
    assert_summaries_exact(env)


def test_retention_keeps_summaries_exact(env: Env) -> None:
    now = env.one("SELECT now()")
    old = [
        env.ing.add(
            make_resource_spans(pid=k, n=10, seed=k), insert_time=now - dt.timedelta(days=3)
        )
        for k in range(2)
    ]
    new = env.ing.add(make_resource_spans(pid=0, n=12, seed=9))
    pid0 = env.pid_of(new)
    got, _ = env.scan(req([pid0]))
    assert len(got) == 22
    stats = retention.run(env.conn, env.dsn, env.store, dt.timedelta(days=1))
    assert stats.blocks == 2
    assert_summaries_exact(env)
    assert env.one("SELECT count(*) FROM otel_block_hours") == 1
    assert env.one("SELECT count(*) FROM otel_process_blocks") == 1
    env.ing.messages = [m for m in env.ing.messages if m[0] not in old]
    got, report = env.scan(req([pid0]))
    assert report.partitions == 1 and len(got) == 12
    assert env.lake.plan(req([pid0])).stale == 0


def test_planner_estimates_read_the_per_process_counters(env: Env) -> None:
    for k in range(3):
        env.ing.add(make_resource_spans(pid=k, n=10 * (k + 1), seed=k))
    assert env.one("SELECT sum(nb_spans) FROM otel_process_blocks") == 60
    assert env.one("SELECT count(*) FROM otel_process_blocks") == 3


def _stale_hours(env: Env, n_procs: int, hours: int) -> list[uuid.UUID]:
    pids = []
    for k in range(n_procs):
        for h in range(hours):
            bid = env.ing.add(
                make_resource_spans(pid=k, n=40, seed=100 * k + h),
                insert_time=HOUR_A + dt.timedelta(hours=h, minutes=k),
            )
        pids.append(env.pid_of(bid))
    return pids


def test_follower_and_scans_never_build_a_partition_twice(env: Env) -> None:
    pids = _stale_hours(env, 4, 3)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def follower() -> None:
        try:
            with psycopg.connect(env.dsn, autocommit=True) as c:
                barrier.wait()
                materialise.run_pass(c, env.store)
        except BaseException as e:  # reported below
            errors.append(e)

    def scanner() -> None:
        try:
            with psycopg.connect(env.dsn, autocommit=True) as c:
                from otelspans_fdw.lake.spans import SpansLake

                barrier.wait()
                reader, _ = SpansLake(c, env.store).scan(req(pids), ["span_id"])
                assert reader.read_all().num_rows == 4 * 3 * 40
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=follower) for _ in range(2)]
    threads += [threading.Thread(target=scanner) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert env.one("SELECT count(*) FROM otel_partitions") == 12
    assert env.one("SELECT max(generation) FROM otel_partitions") == 1
    assert env.one("SELECT count(*) FROM otel_partition_files") == 12
    assert materialise.stale_partitions(env.conn) == []
    got, report = env.scan(req(pids))
    assert report.refreshed == 0 and got == env.ing.expected(pids)


def _cli(env: Env, *args: str, **kw: object) -> subprocess.Popen:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OTELSPANS_DSN": env.dsn}
    return subprocess.Popen(
        [sys.executable, "-m", "otelspans_fdw.cli", "materialise", *args],
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,  # type: ignore[arg-type]
    )


def test_cli_one_pass_with_progress_lines(env: Env) -> None:
    pids = _stale_hours(env, 2, 2)
    p = _cli(env, "--store", env.store.url)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stale"] == 4 and summary["built"] == 4 and summary["blocks_decoded"] == 4
    assert "[4/4] partitions" in err and "\r" not in err  # lines, not a terminal display
    assert env.lake.plan(req(pids)).stale == 0
    assert env.one("SELECT max(generation) FROM otel_partitions") == 1
    p = _cli(env, "--store", env.store.url)
    out, _ = p.communicate(timeout=120)
    assert json.loads(out.strip().splitlines()[-1])["stale"] == 0
    bad = _cli(env, "--max-cpu", "2")
    _, err = bad.communicate(timeout=60)
    assert bad.returncode == 2 and "fraction" in err


def test_cli_follow_keeps_up_and_stops_on_sigterm(env: Env) -> None:
    p = _cli(env, "--store", env.store.url, "--follow", "--interval", "0.2")
    try:
        bid = env.ing.add(make_resource_spans(n=30, seed=1))
        pid = env.pid_of(bid)
        deadline = time.monotonic() + 60
        while env.lake.plan(req([pid])).stale and time.monotonic() < deadline:
            time.sleep(0.2)
        assert env.lake.plan(req([pid])).stale == 0, "the follower built the new partition"
        env.ing.add(make_resource_spans(n=5, seed=2))
        deadline = time.monotonic() + 60
        while env.lake.plan(req([pid])).stale and time.monotonic() < deadline:
            time.sleep(0.2)
        assert env.lake.plan(req([pid])).stale == 0
        got, report = env.scan(req([pid]))
        assert report.refreshed == 0 and len(got) == 35
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert env.one("SELECT generation FROM otel_partitions") == 2
    built = [json.loads(line)["built"] for line in out.splitlines() if line.strip()]
    assert sum(built) == 2


def test_extension_update_backfills_the_summaries(fresh_dsn: str, tmp_path: Path) -> None:
    """A database created by the previous extension version, with blocks, gets exact
    summaries from ALTER EXTENSION otelspans UPDATE, and scans work right after it."""
    from spans_helpers import Ingested

    from otelspans_fdw.objstore import LocalStore

    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        c.execute("CREATE EXTENSION otelspans VERSION '0.1'")
        assert c.execute("SELECT to_regclass('otel_block_hours')").fetchone() == (None,)
    store = LocalStore(tmp_path / "store", durable=False)
    ing = Ingested(fresh_dsn, store)
    for k in range(3):
        ing.add(make_resource_spans(pid=k, n=10, seed=k), insert_time=HOUR_A)
    ing.add(make_resource_spans(pid=0, n=5, seed=7), insert_time=HOUR_A + dt.timedelta(hours=1))
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        c.execute("ALTER EXTENSION otelspans UPDATE")
        assert c.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'otelspans'"
        ).fetchone() == ("0.2",)
    env = Env(fresh_dsn, tmp_path / "store")
    try:
        assert_summaries_exact(env)
        assert env.one("SELECT count(*) FROM otel_block_hours") == 4
        pids = sorted({env.pid_of(b) for b, _ in ing.messages})
        env.ing = ing
        got, report = env.scan(req(pids))
        assert report.partitions == 4 and got == ing.expected()
    finally:
        env.conn.close()
