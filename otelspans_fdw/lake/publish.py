"""Iceberg publisher: the partition files, registered into an Iceberg table for other engines.

Off the query path (``otelspans publish`` or a timer): Iceberg commits are slow and serialise
(DESIGN.md, decision 2), so scans never wait for them.  The catalog is pyiceberg's SQL catalog
in the metadata database itself; the warehouse is the object store, so no byte is copied:
``add_files`` registers the very Parquet files the wrapper reads, in batches (one snapshot per
batch).  Files retired by merges and rebuilds are removed from the table in one overwrite
snapshot; :func:`otelspans_fdw.lake.refresh.collect_garbage` deletes a retired file only once
it is no longer published.

State lives in ``otel_published_files`` (path, published_at).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from otelspans_fdw.objstore import LocalStore, ObjectStore
from otelspans_fdw.schema import TABLE_NAME, arrow_schema

__all__ = [
    "NAMESPACE",
    "PublishStats",
    "catalog_for",
    "publish",
    "unpublish_removed",
]

NAMESPACE = "otelspans"
DEFAULT_BATCH = 500


@dataclass(slots=True)
class PublishStats:
    """What one :func:`publish` did."""

    added: int = 0
    removed: int = 0
    snapshots: int = 0


def _sqlalchemy_url(dsn: str) -> str:
    from sqlalchemy.engine import URL

    d = conninfo_to_dict(dsn)
    host, port = d.get("host"), d.get("port")
    query: dict[str, str] = {}
    if host and host.startswith("/"):
        # A Unix socket directory (the backend's own DSN) cannot be a URL host: pass it, and
        # the port naming the socket file, as query parameters that psycopg receives as is.
        query = {"host": host, **({"port": str(port)} if port else {})}
        host = port = None
    return URL.create(
        "postgresql+psycopg",
        username=d.get("user"),
        password=d.get("password"),
        host=host,
        port=int(port) if port else None,
        database=d.get("dbname"),
        query=query,
    ).render_as_string(hide_password=False)


def _warehouse(store: ObjectStore) -> str:
    if isinstance(store, LocalStore):
        return f"file://{store.root}"
    return store.url


def _location(store: ObjectStore, path: str) -> str:
    if isinstance(store, LocalStore):
        return f"file://{store.fs_path(path)}"
    return f"{store.url.rstrip('/')}/{path}"


def catalog_for(dsn: str, store: ObjectStore) -> Any:
    """pyiceberg's SQL catalog in the metadata database, warehouse in the object store."""
    from pyiceberg.catalog.sql import SqlCatalog

    return SqlCatalog(
        "otelspans",
        uri=_sqlalchemy_url(dsn),
        warehouse=_warehouse(store) + "/iceberg",
        **store.iceberg_properties(),
    )


def _table(catalog: Any) -> Any:
    ident = (NAMESPACE, TABLE_NAME)
    catalog.create_namespace_if_not_exists(NAMESPACE)
    if catalog.table_exists(ident):
        return catalog.load_table(ident)
    return catalog.create_table(ident, schema=arrow_schema())


def publish(
    conn: psycopg.Connection, dsn: str, store: ObjectStore, *, batch: int = DEFAULT_BATCH
) -> PublishStats:
    """Register new partition files and unregister retired ones; return the counts."""
    stats = PublishStats()
    table = _table(catalog_for(dsn, store))
    new = [
        r[0]
        for r in conn.execute(
            "SELECT f.path FROM otel_partition_files f"
            " LEFT JOIN otel_published_files p USING (path)"
            " WHERE p.path IS NULL ORDER BY f.created_at, f.path"
        )
    ]
    for i in range(0, len(new), batch):
        chunk = new[i : i + batch]
        table.add_files([_location(store, p) for p in chunk])
        conn.execute(
            "INSERT INTO otel_published_files (path) SELECT unnest(%s::text[])"
            " ON CONFLICT DO NOTHING",
            (chunk,),
        )
        stats.added += len(chunk)
        stats.snapshots += 1
    stats.removed = _remove_gone(conn, table, store)
    stats.snapshots += int(stats.removed > 0)
    return stats


def _remove_gone(conn: psycopg.Connection, table: Any, store: ObjectStore) -> int:
    """Unregister published files no longer in the partition index (one overwrite snapshot)."""
    gone = [
        r[0]
        for r in conn.execute(
            "SELECT p.path FROM otel_published_files p"
            " LEFT JOIN otel_partition_files f USING (path) WHERE f.path IS NULL"
        )
    ]
    if not gone:
        return 0
    locations = {_location(store, p): p for p in gone}
    table = table.refresh()
    with table.transaction() as tx, tx.update_snapshot().overwrite() as ow:
        for task in table.scan().plan_files():
            if task.file.file_path in locations:
                ow.delete_data_file(task.file)
    conn.execute("DELETE FROM otel_published_files WHERE path = ANY(%s)", (gone,))
    return len(gone)


def unpublish_removed(conn: psycopg.Connection, dsn: str, store: ObjectStore) -> int:
    """Remove from the Iceberg table the files the index dropped (retention, merges), without
    publishing new ones; returns the number removed (0, without opening the catalog, when
    nothing was ever published)."""
    if not conn.execute("SELECT to_regclass('otel_published_files') IS NOT NULL").fetchone()[0]:  # type: ignore[index]
        return 0
    pending = conn.execute(
        "SELECT count(*) FROM otel_published_files p"
        " LEFT JOIN otel_partition_files f USING (path) WHERE f.path IS NULL"
    ).fetchone()
    if not pending or not pending[0]:
        return 0
    return _remove_gone(conn, _table(catalog_for(dsn, store)), store)
