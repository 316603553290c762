"""Trace lookup across processes: which blocks hold given trace ids (issue 6).

The receiver writes ``otel_trace_blocks`` (one row per distinct trace id per block, see
:mod:`otelspans_fdw.db`), so ``WHERE trace_id = X`` needs no process_id: one B-tree probe per
trace id gives the blocks, whose processes and time bounds tell the wrapper which partitions to
refresh and read.  The cost does not grow with the number of blocks in the store (unlike
scanning per-block bloom filters; see bench/RESULTS.md, "Trace index").

Only blocks stored by receivers with the trace index on (the default) are found.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import NamedTuple

import psycopg

__all__ = ["TraceBlock", "blocks_for_traces", "parse_trace_ids"]

SQL_BLOCKS_FOR_TRACES = """
SELECT t.process_id, t.block_id, b.insert_time, min(t.begin_time), max(t.end_time)
FROM otel_trace_blocks t JOIN otel_blocks b ON b.block_id = t.block_id
WHERE t.trace_id = ANY(%s::uuid[])
GROUP BY t.process_id, t.block_id, b.insert_time
ORDER BY t.process_id, b.insert_time, t.block_id
"""


class TraceBlock(NamedTuple):
    """A block holding spans of the asked traces; times bound those traces' spans in it."""

    process_id: uuid.UUID
    block_id: uuid.UUID
    insert_time: datetime
    begin_time: datetime
    end_time: datetime


def parse_trace_ids(trace_ids: list[str]) -> list[uuid.UUID]:
    """Hex trace ids (32 hex digits, dashes and case ignored) as UUIDs, deduplicated.

    Anything else is dropped rather than refused: such an id can match no stored span (the
    receiver indexes only 16-byte ids), so ``trace_id = 'junk'`` simply returns no rows.
    """
    out: dict[uuid.UUID, None] = {}
    for t in trace_ids:
        h = t.strip().replace("-", "")
        if len(h) != 32:
            continue
        try:
            out[uuid.UUID(hex=h)] = None
        except ValueError:
            continue
    return list(out)


def blocks_for_traces(conn: psycopg.Connection, trace_ids: list[str]) -> list[TraceBlock]:
    """Every block holding a span of one of ``trace_ids``, one row per block.

    Ordered by process, then insert time (the order the lake materialises blocks in).  With
    several trace ids, a block holding more than one gets the union of their time bounds.
    """
    ids = parse_trace_ids(trace_ids)
    if not ids:
        return []
    rows = conn.execute(SQL_BLOCKS_FOR_TRACES, (ids,)).fetchall()
    return [TraceBlock(*r) for r in rows]
