"""The otel_spans table over the lake: a scan request in, Arrow batches out.

This is what the wrapper calls; it knows nothing about Multicorn.  A scan:

1. keeps the requested processes that exist (an unknown process simply has no rows);
2. finds the partitions (process, insert hour) whose blocks overlap the window and refreshes
   the stale ones (:mod:`otelspans_fdw.lake.refresh`);
3. lists the partition files overlapping the window from the index;
4. opens one pyarrow scan over them with the projection and the pushed filter.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psycopg
import pyarrow as pa

from otelspans_fdw.lake import parquet, partitions, refresh
from otelspans_fdw.lake.filters import request_expression
from otelspans_fdw.objstore import ObjectStore
from otelspans_fdw.quals import ScanRequest

__all__ = ["ScanReport", "SpansLake"]

_log = logging.getLogger(__name__)


@dataclass(slots=True)
class ScanReport:
    """Everything EXPLAIN shows about one scan."""

    processes: int = 0
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
        out = [
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
    ):
        self.conn = conn
        self.store = store
        self.warn = warn or _log.warning

    def existing_processes(self, process_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
        """The ids among ``process_ids`` that are known processes, sorted."""
        if not process_ids:
            return []
        rows = self.conn.execute(
            "SELECT process_id FROM otel_processes WHERE process_id = ANY(%s) ORDER BY 1",
            (list(process_ids),),
        ).fetchall()
        return [r[0] for r in rows]

    def _describe(self, req: ScanRequest) -> ScanReport:
        report = ScanReport(window=str(req.window))
        report.filters = [str(p) for p in req.predicates]
        if req.window.begin or req.window.end:
            report.filters.insert(
                0,
                "overlap(start_time <= "
                f"{req.window.end.isoformat() if req.window.end else 'infinity'}, end_time >= "
                f"{req.window.begin.isoformat() if req.window.begin else '-infinity'})",
            )
        return report

    def plan(self, req: ScanRequest, *, row_groups: bool = False) -> ScanReport:
        """What a scan would do now, without refreshing (EXPLAIN without ANALYZE)."""
        report = self._describe(req)
        if req.is_empty or req.process_ids is None:
            return report
        pids = self.existing_processes(sorted(req.process_ids))
        report.processes = len(pids)
        states = partitions.partition_states(self.conn, pids, req.window)
        report.partitions = len(states)
        report.stale = sum(not s.fresh for s in states)
        files = partitions.files_for_scan(
            self.conn, [(s.process_id, s.hour) for s in states], req.window
        )
        report.files = len(files)
        report.rows_in_files = sum(f.nb_rows for f in files)
        if row_groups and files:
            _, st = parquet.open_scan(
                self.store,
                [f.path for f in files],
                ["start_time"],
                request_expression(req),
                count_row_groups=True,
            )
            report.row_groups_read, report.row_groups_total = (
                st.row_groups_read,
                st.row_groups_total,
            )
        return report

    def estimate(self, req: ScanRequest) -> int:
        """Rows a scan may return, from the blocks' span counts (no refresh, no file reads)."""
        if req.is_empty or req.process_ids is None:
            return 0
        pids = sorted(req.process_ids)
        states = partitions.partition_states(self.conn, pids, req.window)
        return sum(s.nb_spans for s in states)

    def scan(
        self, req: ScanRequest, columns: Sequence[str], *, count_row_groups: bool = False
    ) -> tuple[pa.RecordBatchReader, ScanReport]:
        """Refresh what the request needs and open the Arrow reader over its files."""
        report = self._describe(req)
        pids: list[uuid.UUID] = []
        if not req.is_empty and req.process_ids is not None:
            pids = self.existing_processes(sorted(req.process_ids))
        report.processes = len(pids)
        states = partitions.partition_states(self.conn, pids, req.window) if pids else []
        report.partitions = len(states)
        report.stale = sum(not s.fresh for s in states)
        if report.stale:
            rs = refresh.refresh_partitions(self.conn, self.store, states, warn=self.warn)
            report.refreshed, report.reused = rs.partitions_refreshed, rs.partitions_reused
            report.blocks_decoded, report.blocks_failed = rs.blocks_decoded, rs.blocks_failed
        else:
            report.reused = len(states)
        files = partitions.files_for_scan(
            self.conn, [(s.process_id, s.hour) for s in states], req.window
        )
        report.files = len(files)
        report.rows_in_files = sum(f.nb_rows for f in files)
        reader, st = parquet.open_scan(
            self.store,
            [f.path for f in files],
            list(columns),
            request_expression(req),
            count_row_groups=count_row_groups,
        )
        if count_row_groups:
            report.row_groups_read, report.row_groups_total = (
                st.row_groups_read,
                st.row_groups_total,
            )
        return reader, report
