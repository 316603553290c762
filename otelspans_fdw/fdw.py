"""``OtelSpansFDW``: the ``otel_spans`` foreign table on the Multicorn2 API.

Runs unchanged under our host and under a real multicorn2.  Per scan: quals -> a
:class:`~otelspans_fdw.quals.ScanRequest` -> :class:`~otelspans_fdw.lake.spans.SpansLake`
(just-in-time refresh, partition index, Parquet) -> a pyarrow ``RecordBatchReader`` that our
host converts to tuples in C (multicorn2 iterates it as rows via :func:`_rows`).

Options (server, then table; the table wins):

``dsn``
    metadata database (libpq string).  Default: ``OTELSPANS_DSN``, else the current database
    over the local Unix socket as the current user (see :mod:`otelspans_fdw.backend`).
``store``
    object store URL or directory with the blocks and partition files.  Default:
    ``OTELSPANS_STORE`` in the server's environment, else ``$PGDATA/otelspans_store``.  It
    must be the receiver's ``--store``.
``rows_per_process``
    planner estimate of rows one process yields when nothing better is known (default 100000).

Metadata access uses its own autocommit connection, shared by the wrappers of a backend, so
materialised partitions persist whatever the user's transaction does.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import psycopg
import pyarrow as pa

try:
    from multicorn import ForeignDataWrapper  # type: ignore[import-not-found]
    from multicorn.utils import WARNING, log_to_postgres  # type: ignore[import-not-found]

    _OUR_HOST = False
except ImportError:
    from otelspans_fdw.multicorn_api import WARNING, ForeignDataWrapper, log_to_postgres

    _OUR_HOST = True

from otelspans_fdw import backend, db
from otelspans_fdw.exceptions import InvalidQueryError
from otelspans_fdw.lake.partitions import ensure_schema
from otelspans_fdw.lake.spans import ScanReport, SpansLake
from otelspans_fdw.objstore import ObjectStore, open_store
from otelspans_fdw.quals import ScanRequest, scan_request
from otelspans_fdw.schema import COLUMN_NAMES

__all__ = ["MISSING_PROCESS_HINT", "OtelSpansFDW"]

MISSING_PROCESS_HINT = (
    "Give the process: WHERE process_id = '<uuid>' (or process_id IN (...)), "
    "or join with otel_processes: SELECT ... FROM otel_processes p "
    "JOIN otel_spans s USING (process_id) WHERE p.exe = '...'."
)
# Rows the planner is told for a scan with no process qual: large, so that a parameterized
# path (process_id from a join) always wins over a scan that would fail.
_NO_PROCESS_ROWS = 10**9
_PATH_KEY_TTL = 60.0

_connections: dict[str, psycopg.Connection] = {}
_stores: dict[str, ObjectStore] = {}


def _connection(dsn: str) -> psycopg.Connection:
    """The backend's metadata connection for ``dsn`` (opened and migrated once)."""
    conn = _connections.get(dsn)
    if conn is not None and not conn.closed and not conn.broken:
        return conn
    conn = db.connect(dsn, autocommit=True)
    if conn.execute("SELECT to_regclass('otel_blocks') IS NULL").fetchone()[0]:  # type: ignore[index]
        db.migrate(conn)
    ensure_schema(conn)
    _connections[dsn] = conn
    return conn


def _store(url: str) -> ObjectStore:
    store = _stores.get(url)
    if store is None:
        store = _stores[url] = open_store(url)
    return store


class OtelSpansFDW(ForeignDataWrapper):  # type: ignore[misc]
    """Spans of the processes named by the quals, refreshed just in time."""

    def __init__(self, fdw_options: dict[str, str], fdw_columns: Mapping[str, Any]):
        super().__init__(fdw_options, fdw_columns)
        self.options = dict(fdw_options)
        self.table_columns = [c for c in fdw_columns if c in COLUMN_NAMES]
        self.rows_per_process = int(self.options.get("rows_per_process", "100000"))
        self._path_rows: tuple[float, int] | None = None
        #: Report of the last scan (tests and EXPLAIN ANALYZE-like inspection).
        self.last_report: ScanReport | None = None

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        return self.options.get("dsn") or backend.default_dsn()

    @property
    def store_url(self) -> str:
        return self.options.get("store") or backend.default_store_url()

    def _lake(self) -> SpansLake:
        return SpansLake(
            _connection(self.dsn),
            _store(self.store_url),
            warn=lambda msg: log_to_postgres(msg, WARNING),
        )

    def _columns(self, columns: Iterable[str]) -> list[str]:
        cols = [c for c in COLUMN_NAMES if c in set(columns)]
        # The host needs a row count even for count(*): read the cheapest column.
        return cols or ["duration"]

    # -- Multicorn API ----------------------------------------------------------------------

    def execute(
        self,
        quals: list[Any],
        columns: Iterable[str],
        sortkeys: list[Any] | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> Any:
        """Arrow batches of the matching spans (PostgreSQL rechecks every qual)."""
        req = scan_request(quals)
        if req.process_ids is None:
            raise InvalidQueryError(
                "otel_spans needs a process_id condition", hint=MISSING_PROCESS_HINT
            )
        reader, self.last_report = self._lake().scan(req, self._columns(columns))
        if _OUR_HOST:
            return reader
        return _rows(reader)

    def get_rel_size(self, quals: list[Any], columns: Iterable[str]) -> tuple[int, int]:
        """Rows from the blocks' span counts of the requested processes and window."""
        width = 40 * len(self._columns(columns))
        req = scan_request(quals)
        if req.process_ids is None:
            return (_NO_PROCESS_ROWS, width)
        if req.is_empty:
            return (1, width)
        try:
            rows = self._lake().estimate(req)
        except psycopg.Error:
            rows = self.rows_per_process * len(req.process_ids)
        return (max(rows, 1), width)

    def get_path_keys(self) -> list[tuple[tuple[str, ...], int]]:
        """``process_id`` given by equality (e.g. from a join) cuts the rows to one process."""
        now = time.monotonic()
        if self._path_rows is None or now - self._path_rows[0] > _PATH_KEY_TTL:
            rows = self.rows_per_process
            try:
                r = (
                    _connection(self.dsn)
                    .execute(
                        "SELECT (sum(nb_spans) / greatest(count(DISTINCT process_id), 1))::bigint"
                        " FROM otel_blocks"
                    )
                    .fetchone()
                )
                if r and r[0]:
                    rows = int(r[0])
            except psycopg.Error:
                pass
            self._path_rows = (now, rows)
        return [(("process_id",), max(self._path_rows[1], 1))]

    def explain(
        self,
        quals: list[Any],
        columns: Iterable[str],
        sortkeys: list[Any] | None = None,
        verbose: bool = False,
    ) -> list[str]:
        """Window, partitions (stale ones are refreshed by the scan), files, row groups, filters."""
        req: ScanRequest = scan_request(quals)
        if req.process_ids is None:
            return ["Process: from a parameter or the outer side of a join"]
        report = self._lake().plan(req, row_groups=verbose)
        return report.lines()


def _rows(reader: pa.RecordBatchReader) -> Iterator[dict[str, Any]]:
    """Rows as dicts, for hosts without the Arrow path (multicorn2): slow but correct."""
    import uuid

    for batch in reader:
        for row in batch.to_pylist():
            for k in ("process_id", "stream_id", "block_id"):
                if isinstance(row.get(k), bytes):
                    row[k] = uuid.UUID(bytes=row[k])
            yield row
