"""Metadata access: connections and the versioned metadata schema.

The metadata tables (processes, streams, blocks) are ordinary PostgreSQL tables so that users
join them with their own data and the wrapper finds blocks with plain indexed SQL.  The schema
is a list of numbered migrations recorded in ``otel_schema_version``; :func:`migrate` applies
the missing ones under a transaction-scoped advisory lock, so a receiver and a CLI (or two
receivers) starting at the same time never race on ``CREATE TABLE``.

Tables (names and columns are relied on by the lake and the wrapper):

``otel_processes``
    one row per OTLP resource identity (see :mod:`otelspans_fdw.ingest.identity`); first write
    wins.  ``properties`` holds every resource attribute as ``otel.resource.<key>``.
``otel_streams``
    one traces stream per process (tags ``{trace}``, format ``otlp/v1/traces``).
``otel_blocks``
    one row per stored ``ResourceSpans`` payload, at ``object_path`` in the object store.
    ``begin_time_ns``/``end_time_ns`` keep the nanosecond bounds that ``timestamptz`` cannot.
``otel_trace_blocks`` (migration 2, issue 6)
    the trace index, **one row per block**: ``trace_ids`` the distinct valid trace ids of its
    spans, ``bounds`` their min start / max end in that block (two big-endian unsigned 64-bit
    integers per id, nanoseconds since the Unix epoch as in OTLP, in ``trace_ids`` order), and
    a GIN index on ``trace_ids``, so ``trace_id = X`` without a process finds its blocks with
    one index probe (see :mod:`otelspans_fdw.traces`).  One row per block rather than one per
    (trace, block) because heap rows were most of the ingestion cost (bench/RESULTS.md, "Trace
    index"); the GIN pending list (``fastupdate``) turns the per-id index work into sorted bulk
    merges, which the receiver runs on a connection of its own
    (:func:`otelspans_fdw.ingest.metadata.clean_trace_index`), ``gin_pending_list_limit``
    (16 MB) only capping the list if those merges cannot run; ``STORAGE EXTERNAL`` skips a
    futile compression attempt on random ids.  The arrays live in TOAST, so the heap looks tiny
    to the planner, which then prefers a scan that detoasts every array (a sequential one, or a
    full scan of the primary key once pending pages raise the GIN estimate: 7 ms at 1,000
    blocks, 70 ms at 10,000, where the GIN probe takes 0.3 ms):
    ``otel_trace_block_bounds(ids)`` runs the lookup with ``enable_seqscan`` and
    ``enable_indexscan`` off, for itself only (bitmap scans remain), and returns each matching
    block (process, id, insert time) with the 16 bytes of bounds of each asked id it holds.
    Written by the receiver in the same transaction as the block rows, only for blocks that
    transaction inserted (the primary key guards against duplicates).  Receivers started with
    ``--no-trace-index`` write no rows for their blocks.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg

from otelspans_fdw.exceptions import MetadataError

__all__ = [
    "MIGRATIONS",
    "MIGRATION_LOCK_KEY",
    "SCHEMA_VERSION",
    "apply_migrations",
    "connect",
    "current_version",
    "default_dsn",
    "migrate",
    "record_setting",
    "setting",
    "status_counts",
]

#: Advisory lock key taken while migrating ("otelmigr" as a big-endian int64).
MIGRATION_LOCK_KEY = int.from_bytes(b"otelmigr", "big", signed=True)

#: Ordered migrations: (version, SQL).  Never edit a released entry; append a new one.
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE otel_processes (
            process_id   uuid PRIMARY KEY,
            exe          text,
            username     text,
            computer     text,
            distro       text,
            service_name text,
            start_time   timestamptz NOT NULL,
            insert_time  timestamptz NOT NULL DEFAULT now(),
            properties   jsonb NOT NULL
        );
        CREATE TABLE otel_streams (
            stream_id   uuid PRIMARY KEY,
            process_id  uuid NOT NULL REFERENCES otel_processes,
            tags        text[] NOT NULL,
            format      text NOT NULL,
            insert_time timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE otel_blocks (
            block_id      uuid PRIMARY KEY,
            stream_id     uuid NOT NULL REFERENCES otel_streams,
            process_id    uuid NOT NULL,
            begin_time    timestamptz,
            end_time      timestamptz,
            begin_time_ns bigint,
            end_time_ns   bigint,
            nb_spans      integer NOT NULL,
            nb_rejected   integer NOT NULL DEFAULT 0,
            payload_size  bigint NOT NULL,
            object_path   text NOT NULL,
            insert_time   timestamptz NOT NULL DEFAULT clock_timestamp()
        );
        CREATE INDEX otel_blocks_process_insert ON otel_blocks (process_id, insert_time);
        CREATE INDEX otel_blocks_process_time ON otel_blocks (process_id, begin_time, end_time);
        """,
    ),
    (
        2,
        """
        CREATE TABLE otel_trace_blocks (
            block_id  uuid PRIMARY KEY,
            trace_ids uuid[] NOT NULL,
            bounds    bytea NOT NULL
        );
        ALTER TABLE otel_trace_blocks
            ALTER trace_ids SET STORAGE EXTERNAL, ALTER bounds SET STORAGE EXTERNAL;
        CREATE INDEX otel_trace_blocks_trace ON otel_trace_blocks
            USING gin (trace_ids) WITH (fastupdate = on, gin_pending_list_limit = 16384);
        CREATE FUNCTION otel_trace_block_bounds(ids uuid[])
            RETURNS TABLE (process_id uuid, block_id uuid, insert_time timestamptz, bounds bytea)
            LANGUAGE sql STABLE ROWS 10 SET enable_seqscan = off SET enable_indexscan = off
        AS $$
            SELECT b.process_id, b.block_id, b.insert_time,
                   substring(t.bounds FROM x.pos * 16 - 15 FOR 16)
            FROM otel_trace_blocks t
            JOIN otel_blocks b ON b.block_id = t.block_id
            CROSS JOIN LATERAL (
                SELECT array_position(t.trace_ids, q.id) FROM unnest(ids) AS q(id)
            ) AS x(pos)
            WHERE t.trace_ids && ids AND x.pos IS NOT NULL
        $$;
        """,
    ),
    (
        3,
        """
        CREATE TABLE otel_settings (
            name       text PRIMARY KEY,
            value      text NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        COMMENT ON TABLE otel_settings IS
            'settings shared by the receiver and the wrapper (store_url: where blocks live)';
        -- time-window scans without process_id look for blocks overlapping the window
        CREATE INDEX otel_blocks_window_idx ON otel_blocks ((greatest(end_time, begin_time)));
        """,
    ),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]

#: The object store the receiver writes to, so that the wrapper reads the same one by default.
STORE_URL_SETTING = "store_url"


def default_dsn() -> str:
    """The DSN to use when none is given: ``OTELSPANS_DSN``, else "" (libpq ``PG*`` env vars)."""
    return os.environ.get("OTELSPANS_DSN", "")


def connect(
    dsn: str | None = None, *, autocommit: bool = False, **kwargs: Any
) -> psycopg.Connection:
    """Open a metadata connection, turning connection failures into :class:`MetadataError`."""
    try:
        return psycopg.connect(
            default_dsn() if dsn is None else dsn, autocommit=autocommit, **kwargs
        )
    except psycopg.OperationalError as e:
        raise MetadataError(
            f"cannot connect to the metadata database: {e}".strip(),
            hint="Set OTELSPANS_DSN or the PG* environment variables.",
        ) from e


def current_version(conn: psycopg.Connection) -> int:
    """The applied schema version (0 for an empty database)."""
    row = conn.execute("SELECT to_regclass('otel_schema_version') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM otel_schema_version").fetchone()
    return int(row[0]) if row else 0


def apply_migrations(
    conn: psycopg.Connection,
    migrations: list[tuple[int, str]],
    *,
    version_table: str,
    lock_key: int,
) -> int:
    """Apply the missing ``migrations``, recorded in ``version_table``; return how many.

    Idempotent, and safe when several processes call it at once: everything runs in one
    transaction that first takes a transaction-scoped advisory lock, so the second caller waits
    and then finds the versions already recorded.  Each component (metadata here, the lake's
    partition index) keeps its own list and table, so one can move without the other.
    """
    applied = 0
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key,))
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {version_table} ("
            " version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        have = {r[0] for r in conn.execute(f"SELECT version FROM {version_table}")}
        for version, sql in migrations:
            if version in have:
                continue
            conn.execute(sql)
            conn.execute(f"INSERT INTO {version_table} (version) VALUES (%s)", (version,))
            applied += 1
    return applied


def migrate(conn: psycopg.Connection) -> int:
    """Bring the metadata schema up to :data:`SCHEMA_VERSION`; return the number applied."""
    return apply_migrations(
        conn, MIGRATIONS, version_table="otel_schema_version", lock_key=MIGRATION_LOCK_KEY
    )


def record_setting(conn: psycopg.Connection, name: str, value: str) -> str:
    """Record ``name`` unless it is already set; return the value in force (first one wins).

    The receiver records its store here: a wrapper whose server has no ``store`` option then
    reads blocks where they were written, with no configuration on either side.
    """
    row = conn.execute(
        "WITH ins AS (INSERT INTO otel_settings (name, value) VALUES (%s, %s)"
        " ON CONFLICT (name) DO NOTHING RETURNING value)"
        " SELECT value FROM ins UNION ALL SELECT value FROM otel_settings WHERE name = %s",
        (name, value, name),
    ).fetchone()
    if not conn.autocommit:
        conn.commit()
    return str(row[0]) if row else value


def setting(conn: psycopg.Connection, name: str) -> str | None:
    """A recorded setting, or None (also before migration 3)."""
    if not conn.execute("SELECT to_regclass('otel_settings') IS NOT NULL").fetchone()[0]:  # type: ignore[index]
        return None
    row = conn.execute("SELECT value FROM otel_settings WHERE name = %s", (name,)).fetchone()
    return str(row[0]) if row else None


def status_counts(conn: psycopg.Connection) -> dict[str, int]:
    """Counts for ``otelspans status``: processes, streams, blocks, spans, rejected, bytes."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM otel_processes),"
        " (SELECT count(*) FROM otel_streams),"
        " count(*), coalesce(sum(nb_spans), 0), coalesce(sum(nb_rejected), 0),"
        " coalesce(sum(payload_size), 0) FROM otel_blocks"
    ).fetchone()
    assert row is not None
    keys = ("processes", "streams", "blocks", "spans", "rejected", "payload_bytes")
    return {k: int(v) for k, v in zip(keys, row, strict=True)}
