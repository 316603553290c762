"""Background materialisation: build stale partitions before a query has to.

A scan refreshes, just in time, every stale partition it needs (:mod:`.refresh`), so a query
after busy ingestion pays for every block that arrived since the last one.  This module does
that work ahead of the queries, with the same function and therefore the same per-partition
advisory lock: a partition the follower and a scan both want is built once (whoever waits
re-reads it under the lock, finds it fresh, and reuses it), and retention, which takes the
same locks, never races either.  The scan stays the source of freshness: whatever this has not
done yet, the query does.

Stale partitions are found from the summaries (``otel_block_hours`` next to
``otel_partitions``, one row per partition each), so a pass costs what is stale plus one
index range over the hours it looks at, not a read of the blocks.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg

from otelspans_fdw.lake import refresh
from otelspans_fdw.objstore import ObjectStore
from otelspans_fdw.schema import SCHEMA_VERSION

__all__ = ["PassStats", "follow", "run_pass", "stale_partitions"]

Progress = Callable[[int, int, refresh.RefreshStats], None]


@dataclass(slots=True)
class PassStats:
    """What one pass did."""

    stale: int = 0
    built: int = 0
    reused: int = 0
    blocks_decoded: int = 0
    blocks_failed: int = 0
    rows_written: int = 0
    seconds: float = 0.0


def stale_partitions(
    conn: psycopg.Connection, since: dt.datetime | None = None
) -> list[tuple[uuid.UUID, dt.datetime]]:
    """(process, hour) of every partition that does not cover exactly the blocks of its hour
    (hours from ``since`` on, when given), oldest hour first."""
    where = "" if since is None else "WHERE h.hour >= %(since)s"
    rows = conn.execute(
        "SELECT h.process_id, h.hour FROM otel_block_hours h"
        " LEFT JOIN otel_partitions p ON p.process_id = h.process_id AND p.hour = h.hour "
        + where
        + (" AND" if where else " WHERE")
        + " (p.process_id IS NULL OR p.nb_blocks <> h.nb_blocks"
        " OR p.block_checksum <> h.block_checksum OR p.schema_version <> %(version)s)"
        " ORDER BY h.hour, h.process_id",
        {"since": since, "version": SCHEMA_VERSION},
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def run_pass(
    conn: psycopg.Connection,
    store: ObjectStore,
    *,
    since: dt.datetime | None = None,
    progress: Progress | None = None,
    warn: refresh.Warn | None = None,
    max_cpu: float = 1.0,
    stop: Callable[[], bool] | None = None,
) -> PassStats:
    """Build every stale partition once; ``max_cpu`` (0 < f <= 1) sleeps after each one so
    that building takes at most that fraction of the time (a follower beside the receiver and
    the queries on a small machine).  ``stop`` ends the pass early (a signal)."""
    t0 = time.perf_counter()
    keys = stale_partitions(conn, since)
    out = PassStats(stale=len(keys))
    rs = refresh.RefreshStats()
    processes: dict[uuid.UUID, refresh._Process] = {}
    for i, (pid, hour) in enumerate(keys):
        if stop is not None and stop():
            break
        t = time.perf_counter()
        refresh.refresh_partition(conn, store, pid, hour, stats=rs, warn=warn, processes=processes)
        if progress is not None:
            progress(i + 1, len(keys), rs)
        if max_cpu < 1.0:
            time.sleep((time.perf_counter() - t) * (1.0 / max_cpu - 1.0))
    out.built, out.reused = rs.partitions_refreshed, rs.partitions_reused
    out.blocks_decoded, out.blocks_failed = rs.blocks_decoded, rs.blocks_failed
    out.rows_written = rs.rows_written
    out.seconds = time.perf_counter() - t0
    return out


def follow(
    conn: psycopg.Connection,
    store: ObjectStore,
    *,
    interval: float = 2.0,
    lookback: dt.timedelta = dt.timedelta(hours=2),
    max_cpu: float = 0.5,
    warn: refresh.Warn | None = None,
    stop: Callable[[], bool] | None = None,
) -> Iterator[PassStats]:
    """Passes over the hours of the last ``lookback`` every ``interval`` seconds, forever
    (or until ``stop``); yields each pass's figures.  Older hours change only through late
    commits and retention, which the first pass (over everything) and the scans cover."""
    first = True
    while stop is None or not stop():
        now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        since = None if first else now - lookback
        first = False
        yield run_pass(conn, store, since=since, warn=warn, max_cpu=max_cpu, stop=stop)
        deadline = time.monotonic() + interval
        while time.monotonic() < deadline and (stop is None or not stop()):
            time.sleep(min(0.2, interval))
