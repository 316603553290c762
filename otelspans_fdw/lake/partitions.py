"""The partition index: which Parquet files hold which blocks' spans, in PostgreSQL.

A partition is ``(process_id, hour)`` where ``hour`` is the UTC hour bucket of the *insert
time* of its blocks: the content of a partition depends only on which blocks were ingested in
that hour, so blocks arriving later (even with old spans) land in a new partition and never
rewrite an old one.  A partition is **fresh** when it covers exactly the blocks that exist
now, checked cheaply by (block count, block-id checksum, schema version) against the hour's
summary row in ``otel_block_hours`` (see :mod:`otelspans_fdw.db`); a stale one is brought up to
date by :mod:`otelspans_fdw.lake.refresh`.

Tables (created by the extension, or by :func:`ensure_schema` where there is none; versioned
in ``otel_lake_schema_version`` apart from the ingestion schema so the two evolve
independently; see :mod:`otelspans_fdw.db`):

``otel_partitions``
    one row per materialised partition: covered block ids, counts, event-time bounds,
    ``generation`` (incremented on each update: tests and EXPLAIN see rebuilds).
``otel_partition_files``
    the files of a partition (a base file and delta files), with per-file time bounds.
``otel_retired_files``
    files replaced by a merge or rebuild, deleted after a grace period (readers that planned
    before the swap keep reading them).
``otel_block_errors``
    blocks that failed to decode: recorded, reported, never silently lost.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from otelspans_fdw import db
from otelspans_fdw.quals import TimeWindow
from otelspans_fdw.schema import SCHEMA_VERSION

__all__ = [
    "LAKE_MIGRATIONS",
    "FileEntry",
    "PartitionState",
    "StoredPartition",
    "block_checksum",
    "ensure_schema",
    "files_for_scan",
    "hour_blocks",
    "hour_of",
    "lock_key",
    "partition_states",
    "partition_states_for_keys",
    "processes_in_window",
    "stored_partition",
]

HOUR = dt.timedelta(hours=1)
_LOCK_KEY = int.from_bytes(b"otellake", "big", signed=True)

LAKE_MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE otel_partitions (
            process_id     uuid NOT NULL,
            hour           timestamptz NOT NULL,
            schema_version integer NOT NULL,
            block_ids      uuid[] NOT NULL,
            nb_blocks      integer NOT NULL,
            block_checksum bigint NOT NULL,
            nb_spans       bigint NOT NULL,
            nb_rows        bigint NOT NULL,
            min_time       timestamptz,
            max_time       timestamptz,
            generation     integer NOT NULL DEFAULT 1,
            updated_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (process_id, hour)
        );
        CREATE TABLE otel_partition_files (
            path          text PRIMARY KEY,
            process_id    uuid NOT NULL,
            hour          timestamptz NOT NULL,
            nb_rows       bigint NOT NULL,
            nb_row_groups integer NOT NULL,
            size          bigint NOT NULL,
            min_time      timestamptz,
            max_time      timestamptz,
            created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
            FOREIGN KEY (process_id, hour) REFERENCES otel_partitions ON DELETE CASCADE
        );
        CREATE INDEX otel_partition_files_partition ON otel_partition_files (process_id, hour);
        CREATE TABLE otel_retired_files (
            path       text PRIMARY KEY,
            retired_at timestamptz NOT NULL DEFAULT clock_timestamp()
        );
        CREATE TABLE otel_block_errors (
            block_id   uuid PRIMARY KEY,
            process_id uuid NOT NULL,
            error      text NOT NULL,
            first_seen timestamptz NOT NULL DEFAULT clock_timestamp(),
            last_seen  timestamptz NOT NULL DEFAULT clock_timestamp(),
            attempts   integer NOT NULL DEFAULT 1
        );
        """,
    ),
    (
        2,
        # The publisher's state (see otelspans_fdw.lake.publish); IF NOT EXISTS because the
        # publisher used to create it itself.
        """
        CREATE TABLE IF NOT EXISTS otel_published_files (
            path         text PRIMARY KEY,
            published_at timestamptz NOT NULL DEFAULT clock_timestamp()
        );
        """,
    ),
]


def ensure_schema(conn: psycopg.Connection) -> int:
    """Create or upgrade the lake tables; return the number of migrations applied.

    For databases without the extension (tests of the lake alone, receiver-only metadata
    databases); never called on the scan path.  A no-op where the extension recorded them.
    """
    return db.apply_migrations(
        conn, LAKE_MIGRATIONS, version_table=db.LAKE_VERSION_TABLE, lock_key=_LOCK_KEY
    )


def block_checksum(block_ids: Iterable[uuid.UUID]) -> int:
    """Sum of the first 32 bits (signed) of each id: the SQL side computes the same."""
    total = 0
    for b in block_ids:
        v = b.int >> 96
        total += v - (1 << 32) if v >= 1 << 31 else v
    return total


# Its SQL twin is in the summaries' trigger (otelspans_fdw.db: otel_block_hours).


def lock_key(process_id: uuid.UUID, hour: dt.datetime) -> int:
    """The advisory lock key serialising refreshes of one partition.

    The hour is normalised to UTC first: the same instant read under another session time
    zone must give the same key, or retention and a refresh would not exclude each other.
    """
    utc = hour.astimezone(dt.UTC).isoformat()
    h = hashlib.blake2b(process_id.bytes + utc.encode(), digest_size=8).digest()
    return int.from_bytes(h, "big", signed=True)


@dataclass(frozen=True, slots=True)
class StoredPartition:
    """An ``otel_partitions`` row."""

    process_id: uuid.UUID
    hour: dt.datetime
    schema_version: int
    block_ids: frozenset[uuid.UUID]
    nb_blocks: int
    block_checksum: int
    nb_spans: int
    nb_rows: int
    generation: int


@dataclass(frozen=True, slots=True)
class PartitionState:
    """A partition a scan needs, with what exists now and what is materialised."""

    process_id: uuid.UUID
    hour: dt.datetime
    nb_blocks: int
    checksum: int
    nb_spans: int
    stored_blocks: int | None
    stored_checksum: int | None
    stored_version: int | None
    stored_rows: int | None

    @property
    def fresh(self) -> bool:
        return (
            self.stored_version == SCHEMA_VERSION
            and self.stored_blocks == self.nb_blocks
            and self.stored_checksum == self.checksum
        )


# Current block counts/checksums of the partitions named by the ``hours`` CTE, next to what
# is materialised, both read from one row each (``otel_block_hours``, kept in the writers'
# transactions, and ``otel_partitions``): the cost follows the partitions, not their blocks.
# Two ways to name them: hours of a process set overlapping a window, or explicit
# (process, hour) keys (the trace lookup's).
_CUR_SQL = """
SELECT c.process_id, c.hour, c.nb_blocks, c.block_checksum, c.nb_spans,
       p.nb_blocks, p.block_checksum, p.schema_version, p.nb_rows
FROM hours h
JOIN otel_block_hours c ON c.process_id = h.process_id AND c.hour = h.hour
LEFT JOIN otel_partitions p ON p.process_id = c.process_id AND p.hour = c.hour
ORDER BY c.process_id, c.hour
"""

# An hour overlaps the window when its blocks' event-time bounds do (a superset of the hours
# with an overlapping block: such an hour simply yields no row); the GiST index on the bounds
# finds them without reading the hours before.
_OVERLAP = (
    "h.min_time IS NOT NULL"
    " AND tstzrange(h.min_time, h.max_time, '[]') && tstzrange(%(begin)s, %(end)s, '[]')"
)

_STATES_SQL = (
    f"""
WITH hours AS (
    SELECT h.process_id, h.hour FROM otel_block_hours h
    WHERE h.process_id = ANY(%(pids)s) AND {_OVERLAP}
)"""
    + _CUR_SQL
)

_KEY_STATES_SQL = (
    """
WITH hours AS (
    SELECT DISTINCT k.process_id, k.hour
    FROM unnest(%(pids)s::uuid[], %(hours)s::timestamptz[]) AS k(process_id, hour)
)"""
    + _CUR_SQL
)

_INF_PAST = dt.datetime(1, 1, 2, tzinfo=dt.UTC)
_INF_FUTURE = dt.datetime(9999, 12, 30, tzinfo=dt.UTC)


def partition_states(
    conn: psycopg.Connection, process_ids: Sequence[uuid.UUID], window: TimeWindow
) -> list[PartitionState]:
    """The partitions holding spans of ``process_ids`` that may overlap ``window``.

    Hours are those whose blocks' event-time bounds overlap the window; each partition then
    stands for every block inserted in its hour.
    """
    if not process_ids:
        return []
    rows = conn.execute(
        _STATES_SQL,
        {
            "pids": list(process_ids),
            "begin": window.begin or _INF_PAST,
            "end": window.end or _INF_FUTURE,
        },
    ).fetchall()
    return _states(rows)


def _states(rows: Sequence[Any]) -> list[PartitionState]:
    return [
        PartitionState(r[0], r[1], int(r[2]), int(r[3]), int(r[4] or 0), r[5], r[6], r[7], r[8])
        for r in rows
    ]


def hour_of(t: dt.datetime) -> dt.datetime:
    """The partition hour of an insert time: the twin of ``date_bin('1 hour', t, 'epoch')``."""
    return dt.datetime.fromtimestamp(int(t.timestamp()) // 3600 * 3600, dt.UTC)


def partition_states_for_keys(
    conn: psycopg.Connection, keys: Sequence[tuple[uuid.UUID, dt.datetime]]
) -> list[PartitionState]:
    """The states of exactly the partitions ``keys`` (process, hour): a trace lookup knows its
    blocks, so it refreshes their partitions and no other hour of those processes."""
    if not keys:
        return []
    rows = conn.execute(
        _KEY_STATES_SQL, {"pids": [k[0] for k in keys], "hours": [k[1] for k in keys]}
    ).fetchall()
    return _states(rows)


def processes_in_window(
    conn: psycopg.Connection, window: TimeWindow, limit: int
) -> list[uuid.UUID]:
    """Processes with hours overlapping ``window``, at most ``limit`` of them (sorted).

    Callers ask for one more than they accept, to tell "exactly the limit" from "more".
    """
    rows = conn.execute(
        f"SELECT DISTINCT h.process_id FROM otel_block_hours h WHERE {_OVERLAP}"
        " ORDER BY 1 LIMIT %(limit)s",
        {"end": window.end or _INF_FUTURE, "begin": window.begin or _INF_PAST, "limit": limit},
    ).fetchall()
    return [r[0] for r in rows]


def stored_partition(
    conn: psycopg.Connection, process_id: uuid.UUID, hour: dt.datetime
) -> StoredPartition | None:
    """The materialised partition row, if any."""
    r = conn.execute(
        "SELECT schema_version, block_ids, nb_blocks, block_checksum, nb_spans, nb_rows,"
        " generation FROM otel_partitions WHERE process_id = %s AND hour = %s",
        (process_id, hour),
    ).fetchone()
    if r is None:
        return None
    return StoredPartition(process_id, hour, r[0], frozenset(r[1]), r[2], r[3], r[4], r[5], r[6])


@dataclass(frozen=True, slots=True)
class BlockRow:
    """The ``otel_blocks`` columns a refresh needs."""

    block_id: uuid.UUID
    stream_id: uuid.UUID
    insert_time: dt.datetime
    object_path: str
    nb_spans: int


def hour_blocks(
    conn: psycopg.Connection, process_id: uuid.UUID, hour: dt.datetime
) -> list[BlockRow]:
    """Every block of the process inserted in ``[hour, hour + 1h)``."""
    rows = conn.execute(
        "SELECT block_id, stream_id, insert_time, object_path, nb_spans FROM otel_blocks"
        " WHERE process_id = %s AND insert_time >= %s AND insert_time < %s ORDER BY block_id",
        (process_id, hour, hour + HOUR),
    ).fetchall()
    return [BlockRow(*r) for r in rows]


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One Parquet file a scan may read."""

    path: str
    process_id: uuid.UUID
    hour: dt.datetime
    nb_rows: int
    nb_row_groups: int
    size: int


def files_for_scan(
    conn: psycopg.Connection,
    keys: Sequence[tuple[uuid.UUID, dt.datetime]],
    window: TimeWindow,
) -> list[FileEntry]:
    """Files of the given partitions whose event-time range overlaps ``window``."""
    if not keys:
        return []
    rows = conn.execute(
        "SELECT f.path, f.process_id, f.hour, f.nb_rows, f.nb_row_groups, f.size"
        " FROM otel_partition_files f"
        " JOIN unnest(%s::uuid[], %s::timestamptz[]) AS k(process_id, hour)"
        "   ON f.process_id = k.process_id AND f.hour = k.hour"
        " WHERE f.min_time <= %s AND f.max_time >= %s"
        " ORDER BY f.process_id, f.hour, f.path",
        (
            [k[0] for k in keys],
            [k[1] for k in keys],
            window.end or _INF_FUTURE,
            window.begin or _INF_PAST,
        ),
    ).fetchall()
    return [FileEntry(*r) for r in rows]
