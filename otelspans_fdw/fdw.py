"""``OtelSpansFDW``: the ``otel_spans`` foreign table on the Multicorn2 API.

Runs unchanged under our host and under a real multicorn2.  Per scan: quals -> a
:class:`~otelspans_fdw.quals.ScanRequest` -> :class:`~otelspans_fdw.lake.spans.SpansLake`
(just-in-time refresh, partition index, Parquet) -> a pyarrow ``RecordBatchReader`` that our
host converts to tuples in C (multicorn2 iterates it as rows via :func:`_rows`).

Options (server, then table; the table wins):

``dsn``
    metadata database (libpq string).  Default: ``OTELSPANS_DSN``, else the current database
    over the local Unix socket as the extension's owner (see :mod:`otelspans_fdw.backend`):
    the lake's role, whichever role queries.
``store``
    object store URL or directory with the blocks and partition files.  Default:
    ``OTELSPANS_STORE`` in the server's environment, else the store the receiver recorded in
    ``otel_settings``, else ``$PGDATA/otelspans_store``.  S3 credentials come from the
    options too (a user mapping FOR PUBLIC; see :func:`otelspans_fdw.objstore.store_from_options`).

``dsn``, ``store``, the S3 endpoint, region and credential mode and the guard's limits are
superuser-only server options (the host's validator, ``ext/option_rights.c``); credentials
may also be in a user mapping, written by a superuser.
``rows_per_process``
    planner estimate of rows one process yields when nothing better is known (default 100000).
``rows_per_trace``
    planner estimate of the rows of one trace, for joins on ``trace_id`` (default 50).
``max_stale_spans``
    most spans (default 2,000,000) a query without a ``process_id`` or ``trace_id`` condition
    may materialise before it reads; beyond it the ERROR says how much is stale and how to
    materialise ahead.  A window whose partitions are fresh is answered whatever its width.
``max_window``
    optional: widest time window (a PostgreSQL interval) such a query may ask for.
``max_processes``
    most processes (default 1000) such a window query may touch.

A scan needs one of: ``process_id`` conditions (or a join with ``otel_processes``),
``trace_id`` conditions (or a join on ``trace_id``: found through the trace index, across
processes), a time window (``start_time >= ...``; an open upper end is the statement's time;
``timestamp`` and ``date`` values are read in the session's TimeZone), or a LIMIT that the
host hands down (``SELECT * FROM otel_spans LIMIT 200``, a BI tool's preview: the newest
partitions, newest spans first).  Others fail with a HINT naming them.

Metadata access uses its own autocommit connection, shared by the wrappers of a backend, so
materialised partitions persist whatever the user's transaction does.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import psycopg
import pyarrow as pa

try:
    # Our host first: a multicorn2 Python package may be importable in its backend too.
    import _otelspans_host  # type: ignore[import-not-found]  # noqa: F401

    _OUR_HOST = True
except ImportError:
    _OUR_HOST = False
try:
    if _OUR_HOST:
        raise ImportError("our host: its own API")
    from multicorn import ForeignDataWrapper  # type: ignore[import-not-found]
    from multicorn.utils import ERROR, WARNING, log_to_postgres  # type: ignore[import-not-found]
except ImportError:  # our host, or outside any backend
    from otelspans_fdw.multicorn_api import ERROR, WARNING, ForeignDataWrapper, log_to_postgres

from otelspans_fdw import backend, db, qualvalues
from otelspans_fdw.exceptions import (
    ConfigurationError,
    InvalidQueryError,
    MetadataError,
    OtelSpansError,
)
from otelspans_fdw.lake import aggregate
from otelspans_fdw.lake.spans import ScanLimits, ScanReport, SpansLake, route
from otelspans_fdw.objstore import file_mode, shared_files, store_from_options
from otelspans_fdw.options import positive_int
from otelspans_fdw.quals import ScanRequest, TimeWindow, scan_request, session_zone
from otelspans_fdw.schema import COLUMN_NAMES

__all__ = ["MISSING_PROCESS_HINT", "NO_QUAL_MESSAGE", "OtelSpansFDW"]

NO_QUAL_MESSAGE = "otel_spans needs a process_id, trace_id or time window condition"
MISSING_PROCESS_HINT = (
    "Give one of: the process, WHERE process_id = '<uuid>' (or IN (...), or "
    "SELECT ... FROM otel_processes p JOIN otel_spans s USING (process_id) WHERE p.exe = '...'); "
    "the trace, WHERE trace_id = '<32 hex digits>' (or IN (...), or a join on trace_id); "
    "a time window, WHERE start_time >= now() - interval '15 minutes'; "
    "or, to preview the newest spans, SELECT * FROM otel_spans LIMIT 200."
)
# Rows the planner is told for a scan with no usable qual: large, so that a parameterized
# path (process_id or trace_id from a join) always wins over a scan that would fail.
_NO_PROCESS_ROWS = 10**9
_DEFAULT_MAX_PROCESSES = 1000
_DEFAULT_MAX_STALE_SPANS = 2_000_000
_intervals: dict[str, dt.timedelta] = {}
_PATH_KEY_TTL = 60.0

_connections: dict[str, psycopg.Connection] = {}


def _connection(dsn: str) -> psycopg.Connection:
    """The backend's metadata connection for ``dsn``, its schema version checked once.

    Creates nothing: the extension owns the schema, and a database behind the code gets an
    ERROR naming the upgrade command.
    """
    conn = _connections.get(dsn)
    if conn is not None and not conn.closed and not conn.broken:
        return conn
    try:
        conn = db.connect(dsn, autocommit=True)
    except MetadataError as e:
        # Inside the server the CLI's advice (environment variables) cannot be followed.
        raise MetadataError(
            str(e),
            hint="The lake connects over the local socket as the otelspans extension's owner"
            " (the server's OS user must be let in as that role: peer for postgres, or a"
            " pg_ident map). Otherwise a superuser names the connection:"
            " ALTER SERVER otel_spans_server OPTIONS (ADD dsn 'host=... user=... password=...').",
        ) from e
    try:
        db.require_current(conn)
    except BaseException:
        conn.close()
        raise
    _connections[dsn] = conn
    return conn


def _interval(conn: psycopg.Connection, text: str) -> dt.timedelta:
    """An interval option as PostgreSQL reads it (``1 day``, ``90 min``, ``PT2H``...)."""
    td = _intervals.get(text)
    if td is None:
        try:
            r = conn.execute("SELECT extract(epoch FROM %s::interval)::float8", (text,)).fetchone()
        except psycopg.Error as e:
            raise ConfigurationError(
                f"otel_spans: max_window {text!r} is not an interval", hint="e.g. '1 day'"
            ) from e
        td = _intervals[text] = dt.timedelta(seconds=float(r[0]))  # type: ignore[index]
    return td


_F = TypeVar("_F", bound=Callable[..., Any])


def _reported(method: _F) -> _F:
    """Our errors leave through ``log_to_postgres(msg, ERROR, hint=..., detail=...)``.

    Our host reads the exception's ``hint``, ``detail`` and ``sqlstate`` itself; multicorn2
    reports any other exception as ``Error in python: <class>`` with the message moved to
    DETAIL and the HINT lost, and keeps message, HINT and DETAIL only for errors raised by its
    ``log_to_postgres`` (whose SQLSTATE is always XX000: it has no way to set one).
    """
    if _OUR_HOST:
        return method

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except OtelSpansError as e:
            log_to_postgres(str(e), ERROR, hint=e.hint, detail=e.detail)
            raise  # not reached: log_to_postgres raises at ERROR

    return call  # type: ignore[return-value]


class OtelSpansFDW(ForeignDataWrapper):  # type: ignore[misc]
    """Spans of the processes named by the quals, refreshed just in time."""

    def __init__(self, fdw_options: dict[str, str], fdw_columns: Mapping[str, Any]):
        super().__init__(fdw_options, fdw_columns)
        self.options = dict(fdw_options)
        self.table_columns = [c for c in fdw_columns if c in COLUMN_NAMES]
        self.rows_per_process = positive_int(self.options, "rows_per_process", "100000")
        self.rows_per_trace = positive_int(self.options, "rows_per_trace", "50")
        self.max_processes = positive_int(self.options, "max_processes", _DEFAULT_MAX_PROCESSES)
        self._path_rows: tuple[float, int] | None = None
        self._total: tuple[float, int] | None = None
        #: Report of the last scan (tests and EXPLAIN ANALYZE-like inspection).
        self.last_report: ScanReport | None = None

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        return self.options.get("dsn") or backend.default_dsn()

    @property
    def store_url(self) -> str:
        return self.options.get("store") or backend.default_store_url(_connection(self.dsn))

    def _lake(self) -> SpansLake:
        conn = _connection(self.dsn)
        max_window = self.options.get("max_window")
        limits = ScanLimits(
            _interval(conn, max_window) if max_window else None,
            self.max_processes,
            positive_int(self.options, "max_stale_spans", _DEFAULT_MAX_STALE_SPANS),
        )
        info = backend.backend_info()
        return SpansLake(
            conn,
            store_from_options(self.options, default=self.store_url),
            warn=lambda msg: log_to_postgres(msg, WARNING),
            limits=limits,
            now=info.statement_time if info else None,
        )

    def _request(self, quals: list[Any]) -> ScanRequest:
        info = backend.backend_info()
        zone = info.timezone if info and info.timezone else None
        if zone is None and not _OUR_HOST:
            zone = qualvalues.session_timezone()
        return scan_request(quals, timezone=session_zone(zone))

    def _columns(self, columns: Iterable[str]) -> list[str]:
        cols = [c for c in COLUMN_NAMES if c in set(columns)]
        # The host needs a row count even for count(*): read the cheapest column.
        return cols or ["duration"]

    # -- Multicorn API ----------------------------------------------------------------------

    @_reported
    def execute(
        self,
        quals: list[Any],
        columns: Iterable[str],
        sortkeys: list[Any] | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> Any:
        """Arrow batches of the matching spans (PostgreSQL rechecks every qual)."""
        req = self._request(quals)
        with file_mode(shared_files(self.options)):  # a refresh writes partition files
            if route(req) == "none":
                if limit is None or offset:
                    raise InvalidQueryError(NO_QUAL_MESSAGE, hint=MISSING_PROCESS_HINT)
                lake = self._lake()
                reader, self.last_report = lake.preview(req, self._columns(columns), limit)
            else:
                reader, self.last_report = self._lake().scan(req, self._columns(columns))
        if _OUR_HOST:
            return reader
        return _rows(reader)

    @_reported
    def get_rel_size(self, quals: list[Any], columns: Iterable[str]) -> tuple[Any, ...]:
        """Rows from the blocks' span counts of the requested processes/traces and window.

        Without a usable condition the scan can only be a preview or an error, so a join must
        take the parameterized path (``process_id`` or ``trace_id`` from the other side).
        Under our host the rows stay the store's real span count (joins above get sane
        estimates, and no JIT) and a third element prices the scan out instead; other hosts
        only read rows, so there the rows themselves must be prohibitive.
        """
        width = 40 * len(self._columns(columns))
        req = self._request(quals)
        if route(req) == "none":
            if _OUR_HOST:
                return (max(self._total_spans(), 1), width, float(_NO_PROCESS_ROWS) * 10 * width)
            return (_NO_PROCESS_ROWS, width)
        if req.is_empty:
            return (1, width)
        try:
            rows = self._lake().estimate(req)
        except (psycopg.Error, InvalidQueryError):
            # A window beyond the limits fails at execution, with the HINT, not at planning.
            r = route(req)
            if r == "process":
                rows = self.rows_per_process * len(req.process_ids or ())
            elif r == "trace":
                rows = self.rows_per_trace * len(req.trace_ids or ())
            else:
                rows = _NO_PROCESS_ROWS
        return (max(rows, 1), width)

    def _total_spans(self) -> int:
        """Spans in the store (from the blocks' counts), re-read at most once a minute."""
        now = time.monotonic()
        if self._total is None or now - self._total[0] > _PATH_KEY_TTL:
            total = 0
            try:
                r = (
                    _connection(self.dsn)
                    .execute("SELECT coalesce(sum(nb_spans), 0)::bigint FROM otel_blocks")
                    .fetchone()
                )
                total = int(r[0]) if r else 0
            except psycopg.Error:
                total = _NO_PROCESS_ROWS
            self._total = (now, total)
        return self._total[1]

    def can_limit(self, limit: int | None, offset: int | None) -> bool:
        """A LIMIT without OFFSET may come down: with no process, trace or window it turns
        the scan into a preview of the newest spans (PostgreSQL still applies the LIMIT)."""
        return limit is not None and not offset

    @_reported
    def get_path_keys(self) -> list[tuple[tuple[str, ...], int]]:
        """``process_id`` given by equality (e.g. from a join) cuts the rows to one process,
        ``trace_id`` to one trace (found across processes through the trace index)."""
        now = time.monotonic()
        if self._path_rows is None or now - self._path_rows[0] > _PATH_KEY_TTL:
            rows = self.rows_per_process
            try:
                r = (
                    _connection(self.dsn)
                    .execute(
                        "SELECT (sum(nb_spans) / greatest(count(*), 1))::bigint"
                        " FROM otel_process_blocks"
                    )
                    .fetchone()
                )
                if r and r[0]:
                    rows = int(r[0])
            except psycopg.Error:
                pass
            self._path_rows = (now, rows)
        keys = [
            (("process_id",), max(self._path_rows[1], 1)),
            (("trace_id",), max(self.rows_per_trace, 1)),
        ]
        if not _OUR_HOST:
            # multicorn2 3.2's EXPLAIN converts a parameterized qual's value without evaluating
            # it: a NULL pointer, which text survives ("?") and uuid does not (the backend
            # crashes).  So no parameterized path on process_id under multicorn2.
            keys = keys[1:]
        return keys

    def can_pushdown_upper(self, query: dict[str, Any]) -> bool:
        """Grouping, aggregates and top-N are answered on the Parquet columns when every
        condition can be applied exactly (our host only; see multicorn_api)."""
        return aggregate.accepts(query) or _newest_first(query)

    def execute_upper(self, query: dict[str, Any]) -> Any:
        """The pushed-down query's rows as an Arrow table (:mod:`otelspans_fdw.lake.aggregate`)."""
        req = self._request(query["quals"])
        if route(req) == "none" and _newest_first(query):
            req = self._newest_window(req, int(query["limit"]))
        if route(req) == "none":
            raise InvalidQueryError(NO_QUAL_MESSAGE, hint=MISSING_PROCESS_HINT)
        lake = self._lake()

        def scan(r: ScanRequest, cols: list[str]) -> pa.RecordBatchReader:
            reader, self.last_report = lake.scan(r, cols)
            return reader

        def top(r: ScanRequest, cols: list[str], key: str, desc: bool, k: int) -> pa.Table | None:
            table, self.last_report = lake.top_rows(r, cols, key, desc, k)
            return table

        return aggregate.answer(query, req, scan, top)

    def _newest_window(self, req: ScanRequest, limit: int) -> ScanRequest:
        """``ORDER BY start_time DESC LIMIT n`` without a process, trace or window, exactly:
        previews of ever more of the newest partitions (their pushed filters applied) until
        ``n`` spans match, the oldest of them starting at T; every one of the ``n`` newest
        matching spans starts at or after T, so the window [T, now] holds them all and the
        ordinary window scan (within the guard) answers.  Fewer matches in the whole store:
        the window is all of it."""
        total = self._total_spans()
        k = limit
        while True:
            with file_mode(shared_files(self.options)):
                reader, _ = self._lake().preview(req, ["start_time"], k)
            starts = reader.read_all().column("start_time")
            if len(starts) >= limit:
                oldest = starts[limit - 1].as_py()
                return dataclasses.replace(req, window=TimeWindow(begin=oldest))
            if k >= total:
                return dataclasses.replace(req, window=TimeWindow(begin=_EPOCH))
            k *= 4

    @_reported
    def explain(
        self,
        quals: list[Any],
        columns: Iterable[str],
        sortkeys: list[Any] | None = None,
        verbose: bool = False,
    ) -> list[str]:
        """Window, partitions (stale ones are refreshed by the scan), files, row groups, filters."""
        req: ScanRequest = self._request(quals)
        if route(req) == "none":
            return [
                "Process, trace or window: known at execution (a parameter, the outer side"
                " of a join, or an expression such as now() - interval '15 minutes')"
            ]
        try:
            report = self._lake().plan(req, row_groups=verbose)
        except InvalidQueryError as e:
            return [f"Refused at execution: {e}"]
        return report.lines()


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _newest_first(query: dict[str, Any]) -> bool:
    """A BI tool's sorted preview: ``SELECT ... [WHERE filters] ORDER BY start_time DESC
    LIMIT n`` with no process, trace or window, no grouping, no offset."""
    order = query.get("order_by") or []
    quals = query["quals"]
    return (
        route(scan_request(quals)) == "none"
        and aggregate.exact_quals(quals)
        and not query.get("grouped")
        and not query.get("offset")
        and query.get("limit") is not None
        and len(order) == 1
        and order[0]["output"] == "start_time"
        and bool(order[0]["descending"])
        and all(c in COLUMN_NAMES for c in query.get("columns") or ())
    )


def _rows(reader: pa.RecordBatchReader) -> Iterator[dict[str, Any]]:
    """Rows as dicts, for hosts without the Arrow path (multicorn2): slow but correct."""
    import uuid

    try:
        for batch in reader:
            for row in batch.to_pylist():
                for k in ("process_id", "stream_id", "block_id"):
                    if isinstance(row.get(k), bytes):
                        row[k] = uuid.UUID(bytes=row[k])
                yield row
    except OtelSpansError as e:  # raised while reading: same report as from execute()
        log_to_postgres(str(e), ERROR, hint=e.hint, detail=e.detail)
