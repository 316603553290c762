"""Trace lookup across processes: which blocks hold given trace ids.

The receiver writes ``otel_trace_blocks`` (one row per block: its trace ids as a GIN-indexed
``uuid[]`` and their time bounds, see :mod:`otelspans_fdw.db`), so ``WHERE trace_id = X`` needs
no process_id: one GIN probe gives the blocks, whose processes and time bounds tell the wrapper
which partitions to refresh and read.  The cost does not grow with the number of blocks in the
store (unlike scanning per-block bloom filters; see bench/RESULTS.md, "Trace index"), and the
answer is exact: the array holds the full ids, so there are no false positives to read.

Only blocks stored by receivers with the trace index on (the default) are found.
"""

from __future__ import annotations

import struct
import uuid
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, NamedTuple

import psycopg

__all__ = ["TraceBlock", "blocks_for_traces", "parse_trace_ids"]

# One GIN probe for all the asked ids, in ``otel_trace_block_bounds`` (see otelspans_fdw.db for
# why a function): per matching block and asked id, the 16 bytes of ``bounds`` at the id's
# position in the block's array.  They are decoded and merged in Python: PostgreSQL has no
# cheap bytea -> int8 cast (nor an unsigned one).
SQL_BLOCKS_FOR_TRACES = """
SELECT process_id, block_id, insert_time, bounds FROM otel_trace_block_bounds(%(ids)s::uuid[])
"""

_BOUNDS = struct.Struct(">QQ")  # nanoseconds
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
    tz = conn.info.timezone  # what psycopg gives every other timestamptz of this connection
    merged: dict[uuid.UUID, list[Any]] = {}
    for pid, bid, ins, raw in conn.execute(SQL_BLOCKS_FOR_TRACES, {"ids": ids}):
        begin_ns, end_ns = _BOUNDS.unpack(raw)
        begin_us, end_us = begin_ns // 1000, end_ns // 1000  # timestamptz: microseconds
        m = merged.get(bid)
        if m is None:
            merged[bid] = [pid, bid, ins, begin_us, end_us]
        else:
            m[3] = min(m[3], begin_us)
            m[4] = max(m[4], end_us)
    rows = sorted(merged.values(), key=lambda r: (r[0], r[2], r[1]))
    return [TraceBlock(pid, bid, ins, _at(b, tz), _at(e, tz)) for pid, bid, ins, b, e in rows]


def _at(us: int, tz: tzinfo) -> datetime:
    """Microseconds since the Unix epoch as the aware datetime psycopg would load."""
    return (_EPOCH + timedelta(microseconds=us)).astimezone(tz)
