"""Just-in-time refresh: bring stale partitions up to date, materialising only missing blocks.

For one stale partition ``(process, hour)``:

1. ``BEGIN``; ``pg_advisory_xact_lock(key(process, hour))`` serialises refreshes of that
   partition across backends.  Whoever waited re-reads the partition under the lock and,
   finding it fresh, does nothing: a partition is built once, the others reuse it.
2. The blocks inserted in the hour, minus those the partition covers, are decoded (payload
   from the object store) into one delta Parquet file, written completely before anything
   refers to it.  A new schema version, or covered blocks that no longer exist, mean a full
   rebuild instead.
3. When the partition would hold more than :data:`MAX_FILES` files, the deltas are merged with
   the new rows into one file (work amortised over many refreshes).
4. In the same transaction: the partition row is upserted, new file rows inserted, replaced
   file rows moved to ``otel_retired_files``.  ``COMMIT`` publishes everything at once and
   releases the lock.  A crash before it leaves only an unreferenced file (removed by
   :func:`collect_garbage`), never a partial partition.

A block that fails to decode is recorded in ``otel_block_errors``, reported through ``warn``
(the wrapper turns it into a PostgreSQL WARNING naming the block) and counted as covered, so a
corrupt payload does not make its partition stale forever.  A payload missing from the store
is reported but not covered: the next scan retries it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import psycopg
import pyarrow as pa

from otelspans_fdw.exceptions import StoreError
from otelspans_fdw.lake import parquet
from otelspans_fdw.lake.decode import BlockInfo, iter_decode_blocks
from otelspans_fdw.lake.partitions import (
    BlockRow,
    PartitionState,
    block_checksum,
    hour_blocks,
    lock_key,
    stored_partition,
)
from otelspans_fdw.objstore import ObjectStore
from otelspans_fdw.schema import SCHEMA_VERSION

__all__ = [
    "DEFAULT_GRACE_SECONDS",
    "MAX_FILES",
    "RefreshStats",
    "collect_garbage",
    "refresh_partition",
    "refresh_partitions",
]

#: Files per partition before deltas are merged.
MAX_FILES = 8
#: Replaced files stay readable this long (running scans planned before the swap).
DEFAULT_GRACE_SECONDS = 600.0

_log = logging.getLogger(__name__)
Warn = Callable[[str], None]


@dataclass(slots=True)
class RefreshStats:
    """What a refresh did (EXPLAIN ANALYZE and the benchmarks read it)."""

    partitions_refreshed: int = 0
    partitions_reused: int = 0
    partitions_rebuilt: int = 0
    partitions_merged: int = 0
    blocks_decoded: int = 0
    blocks_failed: int = 0
    rows_written: int = 0
    seconds: float = 0.0
    failed_block_ids: list[uuid.UUID] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Process:
    exe: str | None
    username: str | None
    computer: str | None
    properties: str
    service_name: str | None


def _process(conn: psycopg.Connection, process_id: uuid.UUID) -> _Process:
    r = conn.execute(
        "SELECT exe, username, computer, properties, service_name FROM otel_processes"
        " WHERE process_id = %s",
        (process_id,),
    ).fetchone()
    if r is None:
        return _Process(None, None, None, "{}", None)
    props = r[3] if isinstance(r[3], dict) else json.loads(r[3] or "{}")
    props_json = json.dumps(props, sort_keys=True, separators=(",", ":"))
    return _Process(r[0], r[1], r[2], props_json, r[4])


def _record_error(conn: psycopg.Connection, block: BlockRow, pid: uuid.UUID, err: str) -> None:
    conn.execute(
        "INSERT INTO otel_block_errors (block_id, process_id, error) VALUES (%s, %s, %s)"
        " ON CONFLICT (block_id) DO UPDATE SET error = excluded.error,"
        " last_seen = clock_timestamp(), attempts = otel_block_errors.attempts + 1",
        (block.block_id, pid, err),
    )


def _decoded_tables(
    conn: psycopg.Connection,
    store: ObjectStore,
    process_id: uuid.UUID,
    blocks: Sequence[BlockRow],
    stats: RefreshStats,
    warn: Warn,
    covered: set[uuid.UUID],
    processes: dict[uuid.UUID, _Process] | None = None,
) -> Iterator[pa.Table]:
    """The decoded rows of ``blocks``, one batch at a time; adds to ``covered`` the ids of the
    blocks consumed so far (decoded or undecodable).

    The blocks go to the decoder together (one columnar pass per batch, whose fixed costs
    would dominate small blocks decoded one by one); payloads are read lazily and the rows
    handed on batch by batch, so a partition of any size holds one batch of each in memory.
    """
    proc = processes.get(process_id) if processes is not None else None
    if proc is None:
        proc = _process(conn, process_id)
        if processes is not None:
            processes[process_id] = proc
    fetched: list[BlockRow] = []  # blocks handed to the decoder, in order

    def payloads() -> Iterator[tuple[bytes, BlockInfo]]:
        for b in blocks:
            try:
                payload = store.get(b.object_path)
            except StoreError as e:
                stats.blocks_failed += 1
                warn(f"otel_spans: block {b.block_id} skipped for now: {e}")
                continue
            fetched.append(b)
            yield (
                payload,
                BlockInfo(
                    process_id,
                    b.stream_id,
                    b.block_id,
                    b.insert_time,
                    proc.exe,
                    proc.username,
                    proc.computer,
                    proc.properties,
                    proc.service_name,
                ),
            )

    done = 0
    for decoded in iter_decode_blocks(payloads()):
        for i in range(done, len(fetched)):
            b = fetched[i]
            err = decoded.errors.get(i)
            if err is not None:
                stats.blocks_failed += 1
                stats.failed_block_ids.append(b.block_id)
                _record_error(conn, b, process_id, str(err))
                warn(f"otel_spans: block {b.block_id} cannot be decoded and is skipped: {err}")
            else:
                stats.blocks_decoded += 1
            covered.add(b.block_id)
        done = len(fetched)
        if decoded.table.num_rows:
            yield decoded.table


def refresh_partition(
    conn: psycopg.Connection,
    store: ObjectStore,
    process_id: uuid.UUID,
    hour: dt.datetime,
    *,
    stats: RefreshStats | None = None,
    warn: Warn | None = None,
    processes: dict[uuid.UUID, _Process] | None = None,
) -> bool:
    """Bring one partition up to date; True if this call changed it (False: reused).

    ``processes`` memoises process rows across the partitions of one refresh (they never
    change: the first write wins), saving a query per partition.
    """
    stats = stats if stats is not None else RefreshStats()
    warn = warn or _log.warning
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(process_id, hour),))
        blocks = hour_blocks(conn, process_id, hour)
        current = {b.block_id for b in blocks}
        stored = stored_partition(conn, process_id, hour)
        if (
            stored is not None
            and stored.schema_version == SCHEMA_VERSION
            and stored.block_ids == current
        ):
            stats.partitions_reused += 1
            return False
        full = (
            stored is None
            or stored.schema_version != SCHEMA_VERSION
            or not stored.block_ids <= current
        )
        covered_before = set() if full else set(stored.block_ids)  # type: ignore[union-attr]
        missing = [b for b in blocks if b.block_id not in covered_before]
        covered_now: set[uuid.UUID] = set()
        tables = _decoded_tables(
            conn, store, process_id, missing, stats, warn, covered_now, processes
        )
        old_files = [] if stored is None else _partition_files(conn, process_id, hour)

        replaced: list[str] = []
        merge: list[tuple[str, int]] = []
        if full:
            replaced = [f[0] for f in old_files]
            keep: list[tuple[str, int]] = []
        else:
            keep = [(f[0], f[1]) for f in old_files]
            if len(keep) + 1 > MAX_FILES:
                # Merge every file but the biggest (the base) with the new rows.
                keep.sort(key=lambda f: f[1], reverse=True)
                merge, keep = keep[1:], keep[:1]
                replaced = [p for p, _ in merge]
                stats.partitions_merged += 1
        # Streamed: rows are decoded, sorted and written a batch at a time (bounded memory).
        written = parquet.write_stream(
            store, process_id, hour, tables, sorted_files=[p for p, _ in merge]
        )
        covered = covered_before | covered_now
        if written is not None:
            stats.rows_written += written.nb_rows
        _commit(conn, process_id, hour, blocks, covered, written, replaced, only_file=not keep)
        stats.partitions_refreshed += 1
        if full and stored is not None:
            stats.partitions_rebuilt += 1
        return True


def _partition_files(
    conn: psycopg.Connection, process_id: uuid.UUID, hour: dt.datetime
) -> list[tuple[str, int]]:
    return [
        (r[0], int(r[1]))
        for r in conn.execute(
            "SELECT path, nb_rows FROM otel_partition_files WHERE process_id = %s AND hour = %s",
            (process_id, hour),
        )
    ]


def _commit(
    conn: psycopg.Connection,
    process_id: uuid.UUID,
    hour: dt.datetime,
    blocks: Sequence[BlockRow],
    covered: set[uuid.UUID],
    written: parquet.WrittenFile | None,
    replaced: Sequence[str],
    *,
    only_file: bool = False,
) -> None:
    """Index updates of one refresh (the caller's transaction makes them atomic).

    With ``only_file`` (a full rebuild, the cold case) the partition's row count and time
    range are those of the new file and go in with the partition row; otherwise they are
    summed over its files afterwards.
    """
    ids = sorted(covered)
    nb_spans = sum(b.nb_spans for b in blocks if b.block_id in covered)
    totals = (
        (written.nb_rows, written.min_time, written.max_time)
        if written is not None
        else (0, None, None)
    )
    conn.execute(
        "INSERT INTO otel_partitions (process_id, hour, schema_version, block_ids, nb_blocks,"
        " block_checksum, nb_spans, nb_rows, min_time, max_time)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (process_id, hour) DO UPDATE SET schema_version = excluded.schema_version,"
        " block_ids = excluded.block_ids, nb_blocks = excluded.nb_blocks,"
        " block_checksum = excluded.block_checksum, nb_spans = excluded.nb_spans,"
        " nb_rows = excluded.nb_rows, min_time = excluded.min_time,"
        " max_time = excluded.max_time,"
        " generation = otel_partitions.generation + 1, updated_at = clock_timestamp()",
        (process_id, hour, SCHEMA_VERSION, ids, len(ids), block_checksum(ids), nb_spans, *totals),
    )
    if replaced:
        conn.execute("DELETE FROM otel_partition_files WHERE path = ANY(%s)", (list(replaced),))
        conn.execute(
            "INSERT INTO otel_retired_files (path) SELECT unnest(%s::text[])"
            " ON CONFLICT DO NOTHING",
            (list(replaced),),
        )
    if written is not None:
        conn.execute(
            "INSERT INTO otel_partition_files (path, process_id, hour, nb_rows, nb_row_groups,"
            " size, min_time, max_time) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (
                written.path,
                process_id,
                hour,
                written.nb_rows,
                written.nb_row_groups,
                written.size,
                written.min_time,
                written.max_time,
            ),
        )
    if only_file:
        return
    conn.execute(
        "UPDATE otel_partitions p SET nb_rows = f.n, min_time = f.lo, max_time = f.hi"
        " FROM (SELECT coalesce(sum(nb_rows), 0) AS n, min(min_time) AS lo, max(max_time) AS hi"
        "       FROM otel_partition_files WHERE process_id = %s AND hour = %s) f"
        " WHERE p.process_id = %s AND p.hour = %s",
        (process_id, hour, process_id, hour),
    )


def refresh_partitions(
    conn: psycopg.Connection,
    store: ObjectStore,
    states: Sequence[PartitionState],
    *,
    warn: Warn | None = None,
) -> RefreshStats:
    """Refresh the stale ones among ``states``; fresh ones are counted as reused."""
    stats = RefreshStats()
    processes: dict[uuid.UUID, _Process] = {}
    t0 = time.perf_counter()
    for st in states:
        if st.fresh:
            stats.partitions_reused += 1
        else:
            refresh_partition(
                conn, store, st.process_id, st.hour, stats=stats, warn=warn, processes=processes
            )
    stats.seconds = time.perf_counter() - t0
    # Give back what the refresh's Arrow buffers took (the allocator keeps freed memory
    # otherwise, and a backend would hold its peak while it idles).
    pa.default_memory_pool().release_unused()
    return stats


def collect_garbage(
    conn: psycopg.Connection,
    store: ObjectStore,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    *,
    orphans: bool = False,
) -> int:
    """Delete retired files older than the grace period (and, with ``orphans``, files under
    ``views/`` that no index row names and that are older than the grace period: leftovers of
    a refresh that crashed before its commit).  Returns the number of files deleted."""
    deleted = 0
    published = conn.execute("SELECT to_regclass('otel_published_files') IS NOT NULL").fetchone()
    # A file still registered in the Iceberg table waits for the publisher to remove it.
    still_published = (
        " AND path NOT IN (SELECT path FROM otel_published_files)"
        if published and published[0]
        else ""
    )
    rows = conn.execute(
        "DELETE FROM otel_retired_files"
        " WHERE retired_at < clock_timestamp() - make_interval(secs => %s)"
        + still_published
        + " RETURNING path",
        (grace_seconds,),
    ).fetchall()
    for (path,) in rows:
        deleted += int(store.delete(path))
    if orphans:
        from otelspans_fdw.objstore import age_seconds

        known = {
            r[0]
            for r in conn.execute(
                "SELECT path FROM otel_partition_files"
                " UNION ALL SELECT path FROM otel_retired_files"
            )
        }
        for path in store.list("views/"):
            if path in known or not path.endswith(".parquet"):
                continue
            age = age_seconds(store, path)
            if age is not None and age > grace_seconds:
                deleted += int(store.delete(path))
    return deleted
