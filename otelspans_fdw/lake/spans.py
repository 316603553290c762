"""The otel_spans table over the lake: a scan request in, Arrow batches out.

This is what the wrapper calls; it knows nothing about Multicorn.  A scan:

1. finds the partitions (process, insert hour) it needs, by one of three routes (the *scope*):

   * **process**: ``process_id`` quals; the requested processes that exist (an unknown
     process simply has no rows), every hour whose blocks overlap the window;
   * **trace**: ``trace_id`` quals and no process: the trace index
     (:func:`otelspans_fdw.lake.trace_index.blocks_for_traces`) names the blocks, hence exactly the
     partitions holding them, and the time range of those traces' spans narrows the window,
     so that the row-group statistics of files sorted by ``start_time`` skip nearly all of
     each file (see bench/RESULTS.md, "Traces");
   * **window**: a bounded time window and nothing else: every process with blocks
     overlapping it, within :class:`ScanLimits` (an ERROR with a HINT beyond them);

2. refreshes the stale ones (:mod:`otelspans_fdw.lake.refresh`);
3. lists the partition files overlapping the window from the index;
4. opens one pyarrow scan over them with the projection and the pushed filter.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import psycopg
import pyarrow as pa

from otelspans_fdw.exceptions import InvalidQueryError
from otelspans_fdw.lake import footers, parquet, partitions, refresh, topn
from otelspans_fdw.lake.filters import request_expression
from otelspans_fdw.lake.partitions import PartitionState
from otelspans_fdw.lake.trace_index import TraceBlock, blocks_for_traces
from otelspans_fdw.objstore import ObjectStore
from otelspans_fdw.quals import ScanRequest, TimeWindow

__all__ = ["ScanLimits", "ScanReport", "Scope", "SpansLake", "route"]

#: Planner guess of the rows one trace has in one block (the index does not count spans).
ROWS_PER_TRACE_BLOCK = 4
#: Parsed footers of partition files, per backend (files are immutable; see lake/footers.py).
FOOTERS = footers.FooterCache()
#: The last statement's trace-index answer: ((statement time, trace ids), blocks).
_TRACE_BLOCKS: tuple[tuple[dt.datetime | None, frozenset[str] | None], list[TraceBlock]] | None = (
    None
)


@dataclass(frozen=True, slots=True)
class ScanLimits:
    """What a scan without process or trace may do (server options): a typo'd dashboard
    query must not materialise a month of every service, but a wide window whose partitions
    are already fresh costs only reading, so the guard counts *work*: ``max_stale_spans``
    spans to materialise (default 2,000,000: about ten seconds at the measured cold rate).
    ``max_window`` (no default) caps the width too where an administrator wants it."""

    max_window: dt.timedelta | None = None
    max_processes: int = 1000
    max_stale_spans: int = 2_000_000


Route = Literal["process", "trace", "window", "preview", "none"]


def route(req: ScanRequest) -> Route:
    """How a scan finds its partitions; ``none``: it cannot (the wrapper refuses the query)."""
    if req.process_ids is not None or req.process_attrs:
        return "process"
    if req.trace_ids is not None:
        return "trace"
    if req.window.begin is not None:
        return "window"  # end open means "until the statement's time": still bounded
    return "none"


#: Partitions a preview (no process, trace or window; a LIMIT) lists per round, newest first.
_PREVIEW_BATCH = 16


@dataclass(slots=True)
class Scope:
    """The partitions a scan reads and the (possibly narrowed) request it reads them with."""

    req: ScanRequest
    states: list[PartitionState]
    processes: int
    route: Route
    trace_blocks: int = 0


_log = logging.getLogger(__name__)


@dataclass(slots=True)
class ScanReport:
    """Everything EXPLAIN shows about one scan."""

    processes: int = 0
    route: str = "process"
    trace_blocks: int | None = None
    window: str = ""
    partitions: int = 0
    stale: int = 0
    refreshed: int = 0
    reused: int = 0
    blocks_decoded: int = 0
    blocks_failed: int = 0
    files: int = 0
    row_groups_read: int | None = None
    row_groups_total: int | None = None
    rows_in_files: int = 0
    filters: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        found = f"Found by: {self.route}"
        if self.trace_blocks is not None:
            found += f" (trace index: {self.trace_blocks} blocks)"
        out = [
            found,
            f"Processes: {self.processes}  Window: {self.window}",
            f"Partitions: {self.partitions} (stale: {self.stale}, refreshed: {self.refreshed},"
            f" reused: {self.reused})",
        ]
        rg = ""
        if self.row_groups_total is not None:
            rg = f"  Row groups: {self.row_groups_read} of {self.row_groups_total}"
        out.append(f"Files: {self.files}{rg}  Rows in files: {self.rows_in_files}")
        if self.blocks_decoded or self.blocks_failed:
            out.append(f"Blocks decoded: {self.blocks_decoded}  failed: {self.blocks_failed}")
        if self.filters:
            out.append("Pushed filters: " + " AND ".join(self.filters))
        return out


class SpansLake:
    """Scans of span partitions, refreshing them just in time."""

    def __init__(
        self,
        conn: psycopg.Connection,
        store: ObjectStore,
        *,
        warn: Callable[[str], None] | None = None,
        limits: ScanLimits | None = None,
        now: dt.datetime | None = None,
    ):
        self.conn = conn
        self.store = store
        self.warn = warn or _log.warning
        self.limits = limits or ScanLimits()
        #: the statement's time: what an open upper end of a window means
        self.now = now

    def existing_processes(self, process_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
        """The ids among ``process_ids`` that are known processes, sorted."""
        if not process_ids:
            return []
        rows = self.conn.execute(
            "SELECT process_id FROM otel_processes WHERE process_id = ANY(%s) ORDER BY 1",
            (list(process_ids),),
        ).fetchall()
        return [r[0] for r in rows]

    def _processes(self, req: ScanRequest) -> list[uuid.UUID]:
        """The known processes named by ``process_id`` and by process attributes (all of the
        conditions hold: PostgreSQL ANDs them)."""
        if not req.process_attrs:
            return self.existing_processes(sorted(req.process_ids or ()))
        where = [f"{col} = ANY(%s)" for col, _ in req.process_attrs]
        params: list[object] = [sorted(vals) for _, vals in req.process_attrs]
        if req.process_ids is not None:
            where.append("process_id = ANY(%s)")
            params.append(sorted(req.process_ids))
        rows = self.conn.execute(
            "SELECT process_id FROM otel_processes WHERE " + " AND ".join(where) + " ORDER BY 1",
            params,
        ).fetchall()
        return [r[0] for r in rows]

    # -- scope: which partitions, by which route --------------------------------------------

    def scope(self, req: ScanRequest) -> Scope:
        """The partitions ``req`` needs (no refresh).  Raises :class:`InvalidQueryError` for a
        request with no route, or a window scan beyond :attr:`limits`."""
        r = route(req)
        if req.is_empty:
            return Scope(req, [], 0, r)
        if r == "process":
            pids = self._processes(req)
            states = partitions.partition_states(self.conn, pids, req.window)
            return Scope(req, states, len(pids), r)
        if r == "trace":
            return self._trace_scope(req)
        if r == "window":
            pids = self._window_processes(req.window)
            states = partitions.partition_states(self.conn, pids, req.window)
            self._check_work(states, len(pids))
            return Scope(req, states, len(pids), r)
        raise InvalidQueryError("otel_spans needs a process_id, trace_id or time condition")

    def _trace_blocks(self, trace_ids: frozenset[str] | None) -> list[TraceBlock]:
        """The trace index's blocks, looked up once per statement: planning (the estimate)
        and execution of one statement see the same blocks, as they would in one snapshot."""
        global _TRACE_BLOCKS
        key = (self.now, trace_ids)
        if self.now is not None and _TRACE_BLOCKS is not None and _TRACE_BLOCKS[0] == key:
            return _TRACE_BLOCKS[1]
        blocks = blocks_for_traces(self.conn, sorted(trace_ids or ()))
        _TRACE_BLOCKS = (key, blocks) if self.now is not None else None
        return blocks

    def _trace_scope(self, req: ScanRequest) -> Scope:
        blocks = self._trace_blocks(req.trace_ids)
        if not blocks:
            return Scope(dataclasses.replace(req, matches_nothing=True), [], 0, "trace")
        keys = sorted({(b.process_id, partitions.hour_of(b.insert_time)) for b in blocks})
        # Every span of these traces starts at or after the earliest begin and, unless its
        # clock ran backwards, no later than the latest end: a narrow window that the
        # row-group statistics of start_time-sorted files turn into one or two row groups.
        window = req.window.narrow(
            begin=min(b.begin_time for b in blocks),
            end=max(max(b.end_time, b.begin_time) for b in blocks),
        )
        narrowed = dataclasses.replace(req, window=window)
        states = partitions.partition_states_for_keys(self.conn, keys)
        return Scope(narrowed, states, len({k[0] for k in keys}), "trace", len(blocks))

    def _check_work(self, states: Sequence[PartitionState], processes: int) -> None:
        """Refuse a scan without process or trace that would materialise too much."""
        stale = [s for s in states if not s.fresh]
        spans = sum(max(s.nb_spans - (s.stored_rows or 0), 0) for s in stale)
        limit = self.limits.max_stale_spans
        if spans <= limit:
            return
        raise InvalidQueryError(
            f"otel_spans: this query would materialise {spans} spans first ({len(stale)} stale"
            f" partitions of {len(states)}, {processes} processes), more than max_stale_spans"
            f" ({limit}) for a query without process_id or trace_id",
            hint="Materialise ahead of time: run `otelspans materialise` (or keep"
            " `otelspans materialise --follow` running), or run it on narrower windows first,"
            " or per process (WHERE process_id = '<uuid>', or a join with otel_processes);"
            " what they materialise stays fresh, and the wide query then only reads. For"
            " otel_service_map(begin, end), call it on a shorter range first. Or raise the"
            " limit: ALTER SERVER otel_spans_server OPTIONS (SET max_stale_spans '10000000')"
            " (ADD the first time).",
        )

    def _window_processes(self, window: TimeWindow) -> list[uuid.UUID]:
        lim = self.limits
        assert window.begin is not None
        end = window.end or self.now or dt.datetime.now(dt.UTC)
        if lim.max_window is not None and end - window.begin > lim.max_window:
            raise InvalidQueryError(
                f"otel_spans: the time window {window} is wider than max_window"
                f" ({_interval(lim.max_window)}) for a query without process_id or trace_id",
                hint="Narrow the window (e.g. start_time >= now() - interval '15 minutes'),"
                " add process_id = '<uuid>' or trace_id = '<hex>', or raise the limit:"
                " ALTER SERVER otel_spans_server OPTIONS (SET max_window '7 days')"
                " (ADD the first time).",
            )
        pids = partitions.processes_in_window(self.conn, window, lim.max_processes + 1)
        if len(pids) > lim.max_processes:
            raise InvalidQueryError(
                f"otel_spans: more than max_processes ({lim.max_processes}) processes have"
                f" spans in the window {window}",
                hint="Narrow the window, add process_id = '<uuid>' (or join with"
                " otel_processes) or trace_id = '<hex>', or raise the limit:"
                " ALTER SERVER otel_spans_server OPTIONS (SET max_processes '5000')"
                " (ADD the first time).",
            )
        return pids

    # -- what the wrapper calls -------------------------------------------------------------

    def _describe(self, scope: Scope) -> ScanReport:
        req = scope.req
        report = ScanReport(window=str(req.window), route=scope.route)
        if scope.route == "trace":
            report.trace_blocks = scope.trace_blocks
        report.processes = scope.processes
        report.partitions = len(scope.states)
        report.stale = sum(not s.fresh for s in scope.states)
        report.filters = [str(p) for p in req.predicates]
        if req.window.begin or req.window.end:
            report.filters.insert(
                0,
                "overlap(start_time <= "
                f"{req.window.end.isoformat() if req.window.end else 'infinity'}, end_time >= "
                f"{req.window.begin.isoformat() if req.window.begin else '-infinity'})",
            )
        return report

    def _files(self, scope: Scope, report: ScanReport) -> list[partitions.FileEntry]:
        """The index's files for ``scope`` (after any refresh), counted in ``report``."""
        files = partitions.files_for_scan(
            self.conn, [(s.process_id, s.hour) for s in scope.states], scope.req.window
        )
        report.files = len(files)
        report.rows_in_files = sum(f.nb_rows for f in files)
        return files

    def _select_row_groups(
        self, scope: Scope, files: Sequence[partitions.FileEntry], report: ScanReport
    ) -> footers.Selection:
        """A trace's few row groups, picked from cached footers (pyarrow's own per-scan
        footer parsing and pruning would grow with the files)."""
        sel = footers.select_row_groups(
            FOOTERS, self.store, [f.path for f in files], scope.req.window
        )
        report.row_groups_read, report.row_groups_total = (
            sel.row_groups_read,
            sel.row_groups_total,
        )
        return sel

    def plan(self, req: ScanRequest, *, row_groups: bool = False) -> ScanReport:
        """What a scan would do now, without refreshing (EXPLAIN without ANALYZE)."""
        scope = self.scope(req)
        report = self._describe(scope)
        files = self._files(scope, report)
        if scope.route == "trace" and files:
            self._select_row_groups(scope, files, report)
        elif row_groups and files:
            _, st = parquet.open_scan(
                self.store,
                [f.path for f in files],
                ["start_time"],
                request_expression(scope.req),
                count_row_groups=True,
            )
            report.row_groups_read, report.row_groups_total = (
                st.row_groups_read,
                st.row_groups_total,
            )
        return report

    def preview(
        self, req: ScanRequest, columns: Sequence[str], limit: int
    ) -> tuple[pa.RecordBatchReader, ScanReport]:
        """``SELECT ... FROM otel_spans LIMIT n`` with no process, trace or window: the newest
        partitions (by insert hour) until they hold ``limit`` spans, refreshed within the
        guard, their rows newest first.  About the cost of a one-process scan."""
        keys: list[tuple[uuid.UUID, dt.datetime]] = []
        spans = 0
        after: tuple[dt.datetime, uuid.UUID] | None = None
        while spans < limit:
            rows = self.conn.execute(
                "SELECT process_id, hour, nb_spans FROM otel_block_hours"
                " WHERE %(h)s::timestamptz IS NULL OR (hour, process_id) < (%(h)s, %(p)s)"
                " ORDER BY hour DESC, process_id DESC LIMIT %(n)s",
                {"h": after and after[0], "p": after and after[1], "n": _PREVIEW_BATCH},
            ).fetchall()
            for pid, hour, n in rows:
                if spans >= limit:
                    break
                keys.append((pid, hour))
                spans += int(n)
            if len(rows) < _PREVIEW_BATCH:
                break
            after = (rows[-1][1], rows[-1][0])
        states = partitions.partition_states_for_keys(self.conn, keys)
        self._check_work(states, len({k[0] for k in keys}))
        scope = Scope(req, states, len({k[0] for k in keys}), "preview")
        report = self._describe(scope)
        self._refresh(scope, report)
        files = self._files(scope, report)
        cols = list(dict.fromkeys([*columns, "start_time"]))
        reader, _ = parquet.open_scan(
            self.store, [f.path for f in files], cols, request_expression(scope.req)
        )
        table = reader.read_all()
        if table.num_rows:
            table = table.sort_by([("start_time", "descending")]).slice(0, limit)
        table = table.select(list(columns))
        return pa.RecordBatchReader.from_batches(table.schema, table.to_batches()), report

    def _refresh(self, scope: Scope, report: ScanReport) -> None:
        if report.stale:
            rs = refresh.refresh_partitions(self.conn, self.store, scope.states, warn=self.warn)
            report.refreshed, report.reused = rs.partitions_refreshed, rs.partitions_reused
            report.blocks_decoded, report.blocks_failed = rs.blocks_decoded, rs.blocks_failed
        else:
            report.reused = len(scope.states)

    def estimate(self, req: ScanRequest) -> int:
        """Rows a scan may return, from the blocks' span counts (no refresh, no file reads)."""
        if req.is_empty or route(req) == "none":
            return 0
        if route(req) == "trace":
            return ROWS_PER_TRACE_BLOCK * len(self._trace_blocks(req.trace_ids))
        return sum(s.nb_spans for s in self.scope(req).states)

    def scan(
        self, req: ScanRequest, columns: Sequence[str], *, count_row_groups: bool = False
    ) -> tuple[pa.RecordBatchReader, ScanReport]:
        """Refresh what the request needs and open the Arrow reader over its files."""
        scope = self.scope(req)
        report = self._describe(scope)
        self._refresh(scope, report)
        files = self._files(scope, report)
        if scope.route == "trace":
            sel = self._select_row_groups(scope, files, report)
            expr = request_expression(scope.req)
            filter_columns = ["start_time", "end_time", *(p.column for p in scope.req.predicates)]
            reader = footers.read_trace_rows(
                self.store,
                sel,
                list(columns),
                sorted(scope.req.trace_ids or ()),
                expr,
                filter_columns,
            )
            return reader, report
        reader, st = parquet.open_scan(
            self.store,
            [f.path for f in files],
            list(columns),
            request_expression(scope.req),
            count_row_groups=count_row_groups,
        )
        if count_row_groups:
            report.row_groups_read, report.row_groups_total = (
                st.row_groups_read,
                st.row_groups_total,
            )
        return reader, report

    def top_rows(
        self, req: ScanRequest, columns: Sequence[str], key: str, descending: bool, k: int
    ) -> tuple[pa.Table | None, ScanReport]:
        """The rows that hold the ``k`` best spans by ``key`` (ties kept), decoding only the
        row groups whose statistics can reach them (:mod:`otelspans_fdw.lake.topn`); None
        on the trace route, whose few row groups a plain scan reads already."""
        scope = self.scope(req)
        report = self._describe(scope)
        if scope.route == "trace":
            return None, report
        self._refresh(scope, report)
        files = self._files(scope, report)
        paths = [f.path for f in files]
        sel = footers.select_row_groups(FOOTERS, self.store, paths, scope.req.window)
        filter_columns = ["start_time", "end_time", *(p.column for p in scope.req.predicates)]
        top = topn.read_top_rows(
            self.store,
            sel,
            columns,
            key,
            descending,
            k,
            request_expression(scope.req),
            filter_columns,
        )
        report.row_groups_read, report.row_groups_total = (
            top.row_groups_read,
            sel.row_groups_total,
        )
        return top.table, report


def _interval(td: dt.timedelta) -> str:
    """A timedelta as PostgreSQL would print the interval (``1 day``, ``02:00:00``)."""
    days, secs = td.days, int(td.total_seconds()) - td.days * 86400
    parts = [f"{days} day{'s' if days != 1 else ''}"] if days else []
    if secs or not parts:
        parts.append(f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}")
    return " ".join(parts)
