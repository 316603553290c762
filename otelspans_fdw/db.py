"""Metadata access: connections and the versioned metadata schema.

The metadata tables (processes, streams, blocks) are ordinary PostgreSQL tables so that users
join them with their own data and the wrapper finds blocks with plain indexed SQL.  The schema
is a list of numbered migrations recorded in ``otel_schema_version``.

Who creates it: the ``otelspans`` extension.  Its install script is generated from these lists
(:mod:`otelspans_fdw.sqlgen`), so every table belongs to the extension, is owned by the
extension's owner, lives in the extension's schema and is dumped by ``pg_dump`` with its rows
(``pg_extension_config_dump``).  A role that can read the tables therefore cannot own one, add
a trigger to one or create one on the scan path: nothing on the scan path creates anything
(:func:`require_current` only checks the version).  :func:`migrate` (the receiver at start,
``otelspans migrate``) installs or updates the extension; only where the extension cannot exist
(a metadata database on a server without it, or one created before it) does it apply the
migrations itself, under a transaction-scoped advisory lock so that concurrent starters never
race on ``CREATE TABLE``.  A new step: append a migration here (or to
:data:`otelspans_fdw.lake.partitions.LAKE_MIGRATIONS`) and a version to
:data:`otelspans_fdw.sqlgen.EXTENSION_VERSIONS`, then regenerate the SQL.

Every connection opened through :func:`connect` to a database with the extension gets a fixed
``search_path`` (``pg_catalog``, the extension's schema, ``pg_temp`` last), so no object that
another role may create in some other schema is ever resolved by the receiver or the lake.

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
    one index probe (see :mod:`otelspans_fdw.lake.trace_index`).  One row per block rather than
    one per (trace, block) because heap rows were most of the ingestion cost (bench/RESULTS.md,
    "Trace index"); the GIN pending list (``fastupdate``) turns the per-id index work into sorted
    bulk merges, which the receiver runs on a connection of its own
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
    "EXTENSION",
    "MIGRATIONS",
    "MIGRATION_LOCK_KEY",
    "SCHEMA_VERSION",
    "apply_migrations",
    "connect",
    "current_version",
    "default_dsn",
    "extension_schema",
    "migrate",
    "pin_search_path",
    "record_setting",
    "require_current",
    "setting",
    "status_counts",
    "version_table_sql",
]

#: Advisory lock key taken while migrating ("otelmigr" as a big-endian int64).
MIGRATION_LOCK_KEY = int.from_bytes(b"otelmigr", "big", signed=True)

# Per-block terms of the summaries: the partition hour (twin of lake.partitions.hour_of), the
# block-id checksum (twin of lake.partitions.block_checksum) and the span count.
_TERMS = (
    "process_id, date_bin('1 hour', insert_time, 'epoch') AS hour,"
    " ('x' || left(block_id::text, 8))::bit(32)::int::bigint AS checksum,"
    " (nb_spans - nb_rejected)::bigint AS spans, begin_time AS lo,"
    " greatest(end_time, begin_time) AS hi"
)
_NEW = f"SELECT {_TERMS}, 1 AS sign FROM new_blocks"
_OLD = f"SELECT {_TERMS}, -1 AS sign FROM old_blocks"


def _summary_upsert(source: str) -> str:
    """The two upserts that apply the signed rows of ``source`` (``sign``: +1 a block that
    appeared, -1 one that went) to the summaries, keys in order so that concurrent writers
    lock rows in the same order and never deadlock.  Bounds only widen: a removed block
    leaves them as they were (a superset still finds every overlapping hour)."""
    return f"""\
                WITH d AS ({source})
                INSERT INTO otel_block_hours AS h
                    (process_id, hour, nb_blocks, block_checksum, nb_spans, min_time, max_time)
                SELECT process_id, hour, sum(sign), sum(sign * checksum), sum(sign * spans),
                       min(lo) FILTER (WHERE sign > 0), max(hi) FILTER (WHERE sign > 0)
                FROM d GROUP BY 1, 2 ORDER BY 1, 2
                ON CONFLICT (process_id, hour) DO UPDATE SET
                    nb_blocks = h.nb_blocks + excluded.nb_blocks,
                    block_checksum = h.block_checksum + excluded.block_checksum,
                    nb_spans = h.nb_spans + excluded.nb_spans,
                    min_time = least(h.min_time, excluded.min_time),
                    max_time = greatest(h.max_time, excluded.max_time);
                WITH d AS ({source})
                INSERT INTO otel_process_blocks AS p (process_id, nb_blocks, nb_spans)
                SELECT process_id, sum(sign), sum(sign * spans) FROM d GROUP BY 1 ORDER BY 1
                ON CONFLICT (process_id) DO UPDATE SET
                    nb_blocks = p.nb_blocks + excluded.nb_blocks,
                    nb_spans = p.nb_spans + excluded.nb_spans;"""


def _summary_prune() -> str:
    """Drop the summaries that the removed blocks emptied (only their keys are read)."""
    return """
                DELETE FROM otel_block_hours h
                USING (SELECT DISTINCT process_id, date_bin('1 hour', insert_time, 'epoch')
                       FROM old_blocks) k (process_id, hour)
                WHERE h.process_id = k.process_id AND h.hour = k.hour AND h.nb_blocks <= 0;
                DELETE FROM otel_process_blocks p
                WHERE p.process_id IN (SELECT process_id FROM old_blocks) AND p.nb_blocks <= 0;"""


# Summaries of otel_blocks whose size follows the processes and hours, not the blocks, kept
# by statement triggers so that they change in the transaction that changes the blocks (the
# receiver's, retention's, anyone's): a reader sees both or neither, hence freshness stays
# exact.  ``otel_block_hours``: one row per (process, insert hour) with its block count,
# checksum, span count and event-time bounds, under a GiST index on the bounds so that a
# window finds its hours without reading older ones.  ``otel_process_blocks``: per-process
# totals for planner estimates.  The function resolves names with the search_path it was
# created with (the extension's schema), whatever the writer's.
_BLOCK_SUMMARIES_SQL = f"""
        CREATE TABLE otel_block_hours (
            process_id     uuid NOT NULL,
            hour           timestamptz NOT NULL,
            nb_blocks      integer NOT NULL,
            block_checksum bigint NOT NULL,
            nb_spans       bigint NOT NULL,
            min_time       timestamptz,
            max_time       timestamptz,
            PRIMARY KEY (process_id, hour)
        );
        CREATE INDEX otel_block_hours_span ON otel_block_hours
            USING gist (tstzrange(min_time, max_time, '[]')) WHERE min_time IS NOT NULL;
        CREATE INDEX otel_block_hours_hour ON otel_block_hours (hour, process_id);
        CREATE TABLE otel_process_blocks (
            process_id uuid PRIMARY KEY,
            nb_blocks  bigint NOT NULL,
            nb_spans   bigint NOT NULL
        );
        CREATE FUNCTION otel_block_summaries() RETURNS trigger
            LANGUAGE plpgsql SET search_path FROM CURRENT AS $fn$
        BEGIN
            IF TG_OP = 'INSERT' THEN
{_summary_upsert(_NEW)}
            ELSIF TG_OP = 'DELETE' THEN
{_summary_upsert(_OLD)}{_summary_prune()}
            ELSE
{_summary_upsert(_NEW + " UNION ALL " + _OLD)}{_summary_prune()}
            END IF;
            RETURN NULL;
        END $fn$;
        CREATE TRIGGER otel_blocks_summaries_ins AFTER INSERT ON otel_blocks
            REFERENCING NEW TABLE AS new_blocks
            FOR EACH STATEMENT EXECUTE FUNCTION otel_block_summaries();
        CREATE TRIGGER otel_blocks_summaries_del AFTER DELETE ON otel_blocks
            REFERENCING OLD TABLE AS old_blocks
            FOR EACH STATEMENT EXECUTE FUNCTION otel_block_summaries();
        CREATE TRIGGER otel_blocks_summaries_upd AFTER UPDATE ON otel_blocks
            REFERENCING OLD TABLE AS old_blocks NEW TABLE AS new_blocks
            FOR EACH STATEMENT EXECUTE FUNCTION otel_block_summaries();
        INSERT INTO otel_block_hours
        SELECT process_id, hour, count(*), sum(checksum), sum(spans), min(lo), max(hi)
        FROM (SELECT {_TERMS} FROM otel_blocks) b GROUP BY 1, 2;
        INSERT INTO otel_process_blocks
        SELECT process_id, count(*), sum(nb_spans - nb_rejected) FROM otel_blocks GROUP BY 1;
"""

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
    (4, _BLOCK_SUMMARIES_SQL),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]

#: The extension that creates the schema (and the version tables that record it).
EXTENSION = "otelspans"
VERSION_TABLE = "otel_schema_version"
LAKE_VERSION_TABLE = "otel_lake_schema_version"
UPGRADE_HINT = (
    "Its owner runs ALTER EXTENSION otelspans UPDATE (or otelspans migrate) after installing "
    "the new extension files (make install)."
)

#: The object store the receiver writes to, so that the wrapper reads the same one by default.
STORE_URL_SETTING = "store_url"


def default_dsn() -> str:
    """The DSN to use when none is given: ``OTELSPANS_DSN``, else "" (libpq ``PG*`` env vars)."""
    return os.environ.get("OTELSPANS_DSN", "")


def connect(
    dsn: str | None = None, *, autocommit: bool = False, **kwargs: Any
) -> psycopg.Connection:
    """Open a metadata connection, turning connection failures into :class:`MetadataError`;
    its ``search_path`` is pinned (:func:`pin_search_path`)."""
    try:
        conn = psycopg.connect(
            default_dsn() if dsn is None else dsn, autocommit=autocommit, **kwargs
        )
    except psycopg.OperationalError as e:
        raise MetadataError(
            f"cannot connect to the metadata database: {e}".strip(),
            hint="Set OTELSPANS_DSN or the PG* environment variables.",
        ) from e
    pin_search_path(conn)
    return conn


def extension_schema(conn: psycopg.Connection) -> str | None:
    """The schema of the installed ``otelspans`` extension, or None."""
    row = conn.execute(
        "SELECT n.nspname FROM pg_catalog.pg_extension e"
        " JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = %s",
        (EXTENSION,),
    ).fetchone()
    return str(row[0]) if row else None


def pin_search_path(conn: psycopg.Connection) -> str | None:
    """Fix the session's ``search_path`` to ``pg_catalog, <extension schema>, pg_temp``.

    Session-wide, also on a connection that is not in autocommit mode (committed here, at
    connect time, before the caller starts any work).  Without the extension the path is left
    alone: a receiver-only metadata database keeps its tables where ``migrate`` put them.
    """
    schema = extension_schema(conn)
    if schema is not None:
        conn.execute(
            "SELECT pg_catalog.set_config('search_path',"
            " 'pg_catalog, ' || pg_catalog.quote_ident(%s) || ', pg_temp', false)",
            (schema,),
        )
    if not conn.autocommit:
        conn.commit()
    return schema


def _versions(conn: psycopg.Connection) -> tuple[int, int]:
    """Recorded (metadata, lake) versions; 0 where a version table is missing."""
    row = conn.execute(
        "SELECT CASE WHEN to_regclass(%s) IS NULL THEN 0 END,"
        " CASE WHEN to_regclass(%s) IS NULL THEN 0 END",
        (VERSION_TABLE, LAKE_VERSION_TABLE),
    ).fetchone()
    assert row is not None
    meta = row[0] if row[0] is not None else _max_version(conn, VERSION_TABLE)
    lake = row[1] if row[1] is not None else _max_version(conn, LAKE_VERSION_TABLE)
    return int(meta), int(lake)


def _max_version(conn: psycopg.Connection, table: str) -> int:
    row = conn.execute(f"SELECT coalesce(max(version), 0) FROM {table}").fetchone()
    return int(row[0]) if row else 0


def _code_versions() -> tuple[int, int]:
    from otelspans_fdw.lake.partitions import LAKE_MIGRATIONS

    return SCHEMA_VERSION, LAKE_MIGRATIONS[-1][0]


def require_current(conn: psycopg.Connection) -> None:
    """Refuse to work on a schema older (or newer) than this code: the scan path never
    creates or migrates anything, so it says who must."""
    have, want = _versions(conn), _code_versions()
    if have == want:
        return
    dbname = conn.info.dbname
    if have == (0, 0):
        raise MetadataError(
            f"database {dbname!r} has no otelspans metadata tables",
            hint="A superuser runs CREATE EXTENSION otelspans in that database "
            "(or the server option dsn names the database that has them).",
        )
    if have < want:
        raise MetadataError(
            f"the otelspans schema of database {dbname!r} is older than the installed code"
            f" (metadata {have[0]}, lake {have[1]}; the code needs {want[0]}, {want[1]})",
            hint=UPGRADE_HINT,
        )
    raise MetadataError(
        f"the otelspans schema of database {dbname!r} is newer than the installed code"
        f" (metadata {have[0]}, lake {have[1]}; the code knows {want[0]}, {want[1]})",
        hint="Install the matching otelspans Python package on this server (make install).",
    )


def current_version(conn: psycopg.Connection) -> int:
    """The applied schema version (0 for an empty database)."""
    return _versions(conn)[0]


def version_table_sql(name: str, *, if_not_exists: bool = False) -> str:
    """DDL of a version table (the extension script and :func:`apply_migrations` share it)."""
    maybe = "IF NOT EXISTS " if if_not_exists else ""
    return (
        f"CREATE TABLE {maybe}{name} ("
        " version integer PRIMARY KEY,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )


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
    Nothing to do where the extension is installed: it owns the schema (see :func:`migrate`).
    """
    if extension_schema(conn) is not None:
        return 0
    applied = 0
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key,))
        conn.execute(version_table_sql(version_table, if_not_exists=True))
        have = {r[0] for r in conn.execute(f"SELECT version FROM {version_table}")}
        for version, sql in migrations:
            if version in have:
                continue
            conn.execute(sql)
            conn.execute(f"INSERT INTO {version_table} (version) VALUES (%s)", (version,))
            applied += 1
    return applied


def migrate(conn: psycopg.Connection) -> int:
    """Bring the schema (metadata and lake) up to this code's; return the steps applied.

    With the extension available on the server: ``CREATE EXTENSION otelspans`` (in the
    connection's current schema) or ``ALTER EXTENSION otelspans UPDATE``, which needs the
    extension's owner or a superuser.  Without it, or in a database whose tables predate it,
    the migrations themselves.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        before = _versions(conn)  # under the lock: a concurrent migrate counts nothing twice
        schema = extension_schema(conn)
        try:
            if schema is None and _available(conn) and before == (0, 0):
                conn.execute(f"CREATE EXTENSION IF NOT EXISTS {EXTENSION}")
            elif schema is not None and before < _code_versions():
                conn.execute(f"ALTER EXTENSION {EXTENSION} UPDATE")
        except psycopg.errors.InsufficientPrivilege as e:
            raise MetadataError(
                f"cannot install or update the otelspans schema as {conn.info.user!r}: "
                f"{e.diag.message_primary}",
                hint="A superuser runs CREATE EXTENSION otelspans (or ALTER EXTENSION "
                "otelspans UPDATE) in this database, or otelspans migrate with its DSN.",
            ) from e
    schema = pin_search_path(conn)
    if schema is None:
        from otelspans_fdw.lake.partitions import ensure_schema

        apply_migrations(conn, MIGRATIONS, version_table=VERSION_TABLE, lock_key=MIGRATION_LOCK_KEY)
        ensure_schema(conn)
    after = _versions(conn)
    if after < _code_versions():
        raise MetadataError(
            f"the otelspans extension of database {conn.info.dbname!r} is older than the code"
            f" even after ALTER EXTENSION otelspans UPDATE (metadata {after[0]}, lake {after[1]})",
            hint="Install the extension files of this version (make install), then run "
            "otelspans migrate again.",
        )
    if not conn.autocommit:
        conn.commit()
    return (after[0] - before[0]) + (after[1] - before[1])


def _available(conn: psycopg.Connection) -> bool:
    row = conn.execute(
        "SELECT 1 FROM pg_catalog.pg_available_extensions WHERE name = %s", (EXTENSION,)
    ).fetchone()
    return row is not None


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
