"""Maintenance entry points run inside a PostgreSQL backend through ``otelspans_call``.

The SQL functions of ``sql/otel_maintenance.sql`` (``otel_retention``, ``otel_publish``) are
SECURITY DEFINER wrappers around ``otelspans_call('otelspans_fdw.maintenance.<name>', args)``.
The work itself is the same Python as the CLI commands; what differs is where configuration
comes from.  There are no command-line flags or ``AWS_*`` variables in a backend, so:

* the object store and its credentials are read the way the wrapper gets them: the options of
  the foreign server (``otel_spans_server`` unless ``server`` is given), then those of the user
  mapping of the current role (the function's owner under SECURITY DEFINER), else PUBLIC's;
* the metadata DSN is the server's ``dsn`` option, else this database over the local socket as
  the extension's owner (the lake's role, as for scans).

Each call opens its own autocommit connection, so every batch commits on its own whatever the
calling transaction does (a retention that fails half-way keeps the batches it finished).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import psycopg

from otelspans_fdw import backend, db
from otelspans_fdw.exceptions import ConfigurationError, InvalidArgumentError
from otelspans_fdw.objstore import ObjectStore, store_from_options
from otelspans_fdw.options import positive_int

__all__ = ["DEFAULT_SERVER", "publish", "retention", "server_options"]

DEFAULT_SERVER = "otel_spans_server"


_OPTIONS_SQL = """
SELECT s.srvoptions,
       (SELECT m.umoptions FROM pg_user_mappings m
         WHERE m.srvid = s.oid AND m.umuser IN (0, (SELECT oid FROM pg_roles
                                                  WHERE rolname = current_user))
         ORDER BY m.umuser = 0 LIMIT 1)
  FROM pg_foreign_server s WHERE s.srvname = %s
"""


def _pairs(items: list[str] | None) -> dict[str, str]:
    return dict(i.split("=", 1) for i in items or [])


def server_options(conn: psycopg.Connection, server: str = DEFAULT_SERVER) -> dict[str, str]:
    """Server options overlaid with the current role's (else PUBLIC's) user mapping options,
    the merge the host gives the wrapper (less table options: maintenance has no table)."""
    row = conn.execute(_OPTIONS_SQL, (server,)).fetchone()
    if row is None:
        raise ConfigurationError(
            f"foreign server {server!r} does not exist",
            hint="CREATE EXTENSION otelspans creates otel_spans_server.",
        )
    opts = _pairs(row[0])
    opts.pop("wrapper", None)
    return {**opts, **_pairs(row[1])}


def _local_dsn() -> str:
    info = backend.backend_info()
    return info.dsn if info is not None else backend.default_dsn()


def _configure(
    server: str,
) -> tuple[psycopg.Connection, str, ObjectStore, dict[str, str]]:
    """Autocommit connection, DSN, store and options of ``server`` for the current role."""
    local = _local_dsn()
    with db.connect(local, autocommit=True) as probe:
        options = server_options(probe, server)
    dsn = options.get("dsn") or local
    conn = db.connect(dsn, autocommit=True)
    store = store_from_options(options, default=backend.default_store_url(conn))
    return conn, dsn, store, options


def retention(
    older_than_seconds: float,
    batch_size: int = 1000,
    grace_seconds: float | None = None,
    server: str = DEFAULT_SERVER,
) -> dict[str, Any]:
    """``otel_retention(...)``: :func:`otelspans_fdw.lake.retention.run`; counts as JSON."""
    from otelspans_fdw.lake import refresh
    from otelspans_fdw.lake import retention as lake_retention

    if older_than_seconds < 0:
        raise InvalidArgumentError(
            "older_than must not be negative",
            hint="Pass how old data must be to go, e.g. older_than => '7 days'.",
        )
    if grace_seconds is not None and grace_seconds < 0:
        raise InvalidArgumentError(
            "grace must not be negative",
            hint="Pass how long replaced files stay readable, e.g. grace => '10 minutes'.",
        )
    conn, dsn, store, _ = _configure(server)
    with conn:
        stats = lake_retention.run(
            conn,
            dsn,
            store,
            dt.timedelta(seconds=older_than_seconds),
            batch_size=batch_size,
            grace_seconds=refresh.DEFAULT_GRACE_SECONDS if grace_seconds is None else grace_seconds,
        )
    return stats.as_dict()


def publish(batch: int = 500, server: str = DEFAULT_SERVER) -> Mapping[str, int | str]:
    """``otel_publish(...)``: register new partition files in the Iceberg table."""
    from otelspans_fdw.lake import publish as lake_publish
    from otelspans_fdw.objstore import file_mode, shared_files

    if batch < 1:
        raise InvalidArgumentError(
            f"batch must be at least 1, not {batch}",
            hint="Pass batch => 1 or more (the default is 500 files per snapshot).",
        )
    conn, dsn, store, options = _configure(server)
    limit = positive_int(options, "max_stale_spans", lake_publish.DEFAULT_MAX_STALE_SPANS)
    with conn, file_mode(shared_files(options)):
        db.require_current(conn)
        stats = lake_publish.publish(conn, dsn, store, batch=batch, max_stale_spans=limit)
    return stats.as_dict()
