"""Retention: remove everything ingested before a cut, in bounded batches, while the system runs.

**What "older than" means.**  The cut is ``now() - older_than`` on the database clock, and it
applies to the *insert time* of blocks (when the receiver stored them), not to span times:
partitions are ``(process, UTC hour of insert time)``, so cutting on insert time removes whole
partitions and never rewrites a Parquet file, and a late block carrying old spans lives as long
as any block inserted with it.  The cut is rounded *down* to the hour: a partition goes only
when every block in it is older than the cut, so nothing younger than ``older_than`` is ever
removed and up to one more hour is kept until the next run.

**What goes, per batch of at most ``batch_size`` blocks of one process (one transaction):**
the ``otel_blocks`` rows and their trace-index (``otel_trace_blocks``) and ``otel_block_errors``
rows, the ``otel_partitions`` rows of the hours they belong to, and those partitions'
``otel_partition_files`` rows, which move to ``otel_retired_files``.  The transaction first
takes the advisory lock of every partition it touches (the lock a just-in-time refresh holds
while it rebuilds a partition), so a refresh never decodes a block that is being deleted and
never commits a file for a partition being removed.  After the commit the payloads of the
deleted blocks are deleted from the object store (a payload is content-addressed: one that a
block row references again, because the same payload was re-sent, is kept).

**Files after a grace period.**  A scan lists its files from the index and then reads them
without a lock, so partition files are never deleted at once: they join the refresh's retired
files and :func:`otelspans_fdw.lake.refresh.collect_garbage` deletes them once older than the
grace period (and no longer in the Iceberg table), at the end of this run or the next one.

**Then:** partitions of hours before the cut that have no blocks (left by a refresh that raced
a previous run) are removed the same way; processes that have no block left are removed with
their streams (the receiver writes a process, its stream and its blocks in one transaction, so
such a process had blocks and they all expired; if it sends again later it is simply registered
again, and if it sends during that very transaction its request fails once and the client's
retry recreates it); files the index dropped are removed from the Iceberg table when one was
published (:func:`otelspans_fdw.lake.publish.unpublish_removed`), then garbage is collected.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from otelspans_fdw.exceptions import InvalidArgumentError
from otelspans_fdw.lake import publish, refresh
from otelspans_fdw.lake.partitions import ensure_schema, lock_key
from otelspans_fdw.objstore import ObjectStore

__all__ = ["DEFAULT_BATCH", "RetentionStats", "parse_duration", "run"]

DEFAULT_BATCH = 1000
_log = logging.getLogger(__name__)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_FK_RETRIES = 3


def parse_duration(text: str) -> dt.timedelta:
    """``30m``, ``12h``, ``7d``, ``2w``, ``90s`` (or plain seconds) as a timedelta."""
    m = _DURATION.match(text)
    if m:
        return dt.timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2).lower()])
    try:
        return dt.timedelta(seconds=float(text))
    except ValueError:
        raise InvalidArgumentError(
            f"invalid duration {text!r}: use e.g. 30m, 12h, 7d",
            hint="A number and a unit: s, m, h, d or w (plain numbers are seconds).",
        ) from None


@dataclass(slots=True)
class RetentionStats:
    """What one :func:`run` removed (the CLI and the SQL function report it as JSON)."""

    cut: str = ""
    batches: int = 0
    blocks: int = 0
    payloads: int = 0
    trace_rows: int = 0
    partitions: int = 0
    partition_files_retired: int = 0
    streams: int = 0
    processes: int = 0
    iceberg_files_removed: int = 0
    files_deleted: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lock_partitions(conn: psycopg.Connection, keys: set[tuple[uuid.UUID, dt.datetime]]) -> None:
    """Take the refresh locks of ``keys`` in one global order (two runs never deadlock)."""
    for k in sorted({lock_key(p, h) for p, h in keys}):
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (k,))


def _retire_partitions(
    conn: psycopg.Connection, process_id: uuid.UUID, hours: list[dt.datetime]
) -> tuple[int, int]:
    """Move the partitions' files to the retired list and delete their rows (caller's txn)."""
    retired = conn.execute(
        "WITH f AS (DELETE FROM otel_partition_files WHERE process_id = %s AND hour = ANY(%s)"
        " RETURNING path)"
        " INSERT INTO otel_retired_files (path) SELECT path FROM f ON CONFLICT DO NOTHING",
        (process_id, hours),
    ).rowcount
    parts = conn.execute(
        "DELETE FROM otel_partitions WHERE process_id = %s AND hour = ANY(%s)",
        (process_id, hours),
    ).rowcount
    return parts, retired


def _has_table(conn: psycopg.Connection, name: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
    return bool(row and row[0])


def _block_batch(
    conn: psycopg.Connection,
    process_id: uuid.UUID,
    boundary: dt.datetime,
    batch_size: int,
    stats: RetentionStats,
    trace_index: bool,
) -> list[tuple[uuid.UUID, str]]:
    """Delete one batch of a process's old blocks; return the deleted (block_id, path)."""
    with conn.transaction():
        rows = conn.execute(
            "SELECT block_id, date_bin('1 hour', insert_time, 'epoch') FROM otel_blocks"
            " WHERE process_id = %s AND insert_time < %s"
            " ORDER BY insert_time, block_id LIMIT %s",
            (process_id, boundary, batch_size),
        ).fetchall()
        if not rows:
            return []
        hours = sorted({r[1] for r in rows})
        _lock_partitions(conn, {(process_id, h) for h in hours})
        ids = [r[0] for r in rows]
        deleted = conn.execute(
            "DELETE FROM otel_blocks WHERE block_id = ANY(%s) RETURNING block_id, object_path",
            (ids,),
        ).fetchall()
        if trace_index:
            stats.trace_rows += conn.execute(
                "DELETE FROM otel_trace_blocks WHERE block_id = ANY(%s)", (ids,)
            ).rowcount
        conn.execute("DELETE FROM otel_block_errors WHERE block_id = ANY(%s)", (ids,))
        parts, retired = _retire_partitions(conn, process_id, hours)
    stats.batches += 1
    stats.blocks += len(deleted)
    stats.partitions += parts
    stats.partition_files_retired += retired
    return [(r[0], r[1]) for r in deleted]


def _delete_payloads(
    conn: psycopg.Connection, store: ObjectStore, deleted: list[tuple[uuid.UUID, str]]
) -> int:
    """Delete the payloads of deleted blocks, except those a block row names again."""
    again = {
        r[0]
        for r in conn.execute(
            "SELECT object_path FROM otel_blocks WHERE block_id = ANY(%s)",
            ([b for b, _ in deleted],),
        )
    }
    return sum(int(store.delete(p)) for _, p in deleted if p not in again)


def _remove_blocks(
    conn: psycopg.Connection,
    store: ObjectStore,
    boundary: dt.datetime,
    batch_size: int,
    stats: RetentionStats,
) -> None:
    trace_index = _has_table(conn, "otel_trace_blocks")
    pids = [r[0] for r in conn.execute("SELECT process_id FROM otel_processes ORDER BY 1")]
    for pid in pids:
        while True:
            deleted = _block_batch(conn, pid, boundary, batch_size, stats, trace_index)
            if not deleted:
                break
            stats.payloads += _delete_payloads(conn, store, deleted)


def _remove_leftover_partitions(
    conn: psycopg.Connection, boundary: dt.datetime, batch_size: int, stats: RetentionStats
) -> None:
    """Partitions of hours before the cut that no block backs any more."""
    while True:
        with conn.transaction():
            keys = conn.execute(
                "SELECT process_id, hour FROM otel_partitions WHERE hour < %s"
                " ORDER BY hour, process_id LIMIT %s",
                (boundary, batch_size),
            ).fetchall()
            if not keys:
                return
            _lock_partitions(conn, {(k[0], k[1]) for k in keys})
            by_process: dict[uuid.UUID, list[dt.datetime]] = {}
            for pid, hour in keys:
                by_process.setdefault(pid, []).append(hour)
            for pid, hours in by_process.items():
                parts, retired = _retire_partitions(conn, pid, hours)
                stats.partitions += parts
                stats.partition_files_retired += retired
        stats.batches += 1


def _remove_empty_processes(
    conn: psycopg.Connection, batch_size: int, stats: RetentionStats
) -> None:
    """Processes (and their streams) that have no block left."""
    failures = 0
    while True:
        try:
            with conn.transaction():
                pids = [
                    r[0]
                    for r in conn.execute(
                        "SELECT p.process_id FROM otel_processes p"
                        " WHERE NOT EXISTS (SELECT 1 FROM otel_blocks b"
                        "                   WHERE b.process_id = p.process_id)"
                        " ORDER BY 1 LIMIT %s FOR UPDATE OF p SKIP LOCKED",
                        (batch_size,),
                    )
                ]
                if not pids:
                    return
                stats.streams += conn.execute(
                    "DELETE FROM otel_streams WHERE process_id = ANY(%s)", (pids,)
                ).rowcount
                stats.processes += conn.execute(
                    "DELETE FROM otel_processes WHERE process_id = ANY(%s)", (pids,)
                ).rowcount
            stats.batches += 1
        except psycopg.errors.ForeignKeyViolation as e:
            # A receiver committed a block for one of them meanwhile: the next round no
            # longer selects it.
            failures += 1
            _log.info("retention: process removal raced with ingestion: %s", e)
            if failures >= _FK_RETRIES:
                return


def cut_boundary(conn: psycopg.Connection, older_than: dt.timedelta) -> dt.datetime:
    """The start of the UTC hour holding ``now() - older_than`` (database clock)."""
    row = conn.execute(
        "SELECT date_bin('1 hour', now() - %s::interval, 'epoch')", (older_than,)
    ).fetchone()
    assert row is not None
    return row[0]


def run(
    conn: psycopg.Connection,
    dsn: str,
    store: ObjectStore,
    older_than: dt.timedelta,
    *,
    batch_size: int = DEFAULT_BATCH,
    grace_seconds: float = refresh.DEFAULT_GRACE_SECONDS,
) -> RetentionStats:
    """Remove everything inserted before the cut (see the module docstring); ``conn`` must be
    in autocommit mode so that each batch commits on its own."""
    if batch_size < 1:
        raise InvalidArgumentError(
            f"batch_size must be at least 1, not {batch_size}",
            hint="Pass batch_size => 1 or more (the default is 1000 blocks per transaction).",
        )
    if not conn.autocommit:
        raise ValueError("retention needs an autocommit connection (one transaction per batch)")
    stats = RetentionStats()
    if not _has_table(conn, "otel_blocks"):
        return stats
    ensure_schema(conn)
    boundary = cut_boundary(conn, older_than)
    stats.cut = boundary.astimezone(dt.UTC).isoformat()
    _remove_blocks(conn, store, boundary, batch_size, stats)
    _remove_leftover_partitions(conn, boundary, batch_size, stats)
    _remove_empty_processes(conn, batch_size, stats)
    stats.iceberg_files_removed = publish.unpublish_removed(conn, dsn, store)
    stats.files_deleted = refresh.collect_garbage(conn, store, grace_seconds)
    return stats
