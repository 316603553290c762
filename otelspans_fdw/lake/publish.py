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

import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from otelspans_fdw.exceptions import InvalidQueryError
from otelspans_fdw.lake import partitions, refresh
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
#: Spans a publish may materialise first (server option / --max-stale-spans).
DEFAULT_MAX_STALE_SPANS = 2_000_000


class _ExpectedStatistics(logging.Filter):
    """pyiceberg warns once per file and column without Parquet statistics; the partition
    writer leaves them out on purpose (JSON and id columns: no pruning value), so these
    warnings say nothing and would flood every publish."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyArrow statistics missing")


logging.getLogger("pyiceberg.io.pyarrow").addFilter(_ExpectedStatistics())


@dataclass(slots=True)
class PublishStats:
    """What one :func:`publish` did."""

    added: int = 0
    removed: int = 0
    snapshots: int = 0
    #: the table's current metadata file: what an engine without this catalog opens, e.g.
    #: DuckDB's ``iceberg_scan('<metadata_location>')``
    metadata_location: str = ""

    def as_dict(self) -> dict[str, int | str]:
        return {
            "added": self.added,
            "removed": self.removed,
            "snapshots": self.snapshots,
            "metadata_location": self.metadata_location,
        }


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


def materialise_stale(
    conn: psycopg.Connection, store: ObjectStore, *, max_stale_spans: int | None
) -> int:
    """Bring every partition up to the blocks ingested so far (the Iceberg table must hold
    every span, not only what queries happened to read); return the spans it had to
    materialise.  More than ``max_stale_spans`` is refused before any work, as for a query."""
    from otelspans_fdw.lake.materialise import stale_partitions

    keys = stale_partitions(conn)  # from the hour summaries, not a pass over the blocks
    stale = [s for s in partitions.partition_states_for_keys(conn, keys) if not s.fresh]
    spans = sum(max(s.nb_spans - (s.stored_rows or 0), 0) for s in stale)
    if max_stale_spans is not None and spans > max_stale_spans:
        raise InvalidQueryError(
            f"publish would materialise {spans} spans first ({len(stale)} stale partitions),"
            f" more than max_stale_spans ({max_stale_spans})",
            hint="Allow it for this run: otelspans publish --max-stale-spans N (in SQL: ALTER"
            " SERVER otel_spans_server OPTIONS (SET max_stale_spans 'N')), or publish more"
            " often so each run has less to do.",
        )
    if stale:
        refresh.refresh_partitions(conn, store, stale)
    return spans


def publish(
    conn: psycopg.Connection,
    dsn: str,
    store: ObjectStore,
    *,
    batch: int = DEFAULT_BATCH,
    materialise: bool = True,
    max_stale_spans: int | None = DEFAULT_MAX_STALE_SPANS,
) -> PublishStats:
    """Materialise what is stale (unless ``materialise`` is off), register new partition files
    and unregister retired ones; return the counts."""
    if materialise:
        materialise_stale(conn, store, max_stale_spans=max_stale_spans)
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
    stats.metadata_location = str(table.refresh().metadata_location)
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
