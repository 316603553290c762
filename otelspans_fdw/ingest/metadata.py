"""Writing the metadata rows of stored blocks: one transaction per batch, sync or async.

Rows are built once (:func:`batch_params`) and inserted with ``unnest`` arrays, three statements
per batch whatever its size, so that many concurrent requests can share one commit (see
:mod:`otelspans_fdw.ingest.groupcommit`).  Every insert is ``ON CONFLICT DO NOTHING``: ids are
deterministic, so retries and concurrent receivers converge; keys are sorted so that two
receivers committing overlapping batches lock rows in the same order and never deadlock.

The trace index (``otel_trace_blocks``, issue 6) is written in the same transaction with one
binary ``COPY`` built here with :mod:`struct` (no per-value adaptation), and only for the blocks
that the ``INSERT ... RETURNING`` of this transaction really inserted, so retried or concurrently
sent blocks never duplicate index rows although the index table has no unique key.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg

from otelspans_fdw.ingest.decode import Block
from otelspans_fdw.ingest.identity import STREAM_FORMAT, STREAM_TAGS

__all__ = [
    "SQL_BLOCKS",
    "SQL_PROCESSES",
    "SQL_STREAMS",
    "SQL_TRACE_COPY",
    "batch_params",
    "trace_copy_data",
    "write_blocks",
    "write_blocks_async",
]

SQL_PROCESSES = """
INSERT INTO otel_processes
    (process_id, exe, username, computer, distro, service_name, start_time, properties)
SELECT p, e, u, c, d, s, coalesce(t, now()), j::jsonb
FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
            %s::timestamptz[], %s::text[]) AS r(p, e, u, c, d, s, t, j)
ORDER BY p
ON CONFLICT (process_id) DO NOTHING
"""

SQL_STREAMS = """
INSERT INTO otel_streams (stream_id, process_id, tags, format)
SELECT s, p, %s::text[], %s FROM unnest(%s::uuid[], %s::uuid[]) AS r(s, p)
ORDER BY s
ON CONFLICT (stream_id) DO NOTHING
"""

SQL_BLOCKS = """
INSERT INTO otel_blocks
    (block_id, stream_id, process_id, begin_time, end_time, begin_time_ns, end_time_ns,
     nb_spans, nb_rejected, payload_size, object_path)
SELECT * FROM unnest(%s::uuid[], %s::uuid[], %s::uuid[], %s::timestamptz[], %s::timestamptz[],
                     %s::int8[], %s::int8[], %s::int4[], %s::int4[], %s::int8[], %s::text[])
ORDER BY 1
ON CONFLICT (block_id) DO NOTHING
RETURNING block_id
"""

SQL_TRACE_COPY = (
    "COPY otel_trace_blocks (trace_id, block_id, process_id, begin_time, end_time)"
    " FROM STDIN (FORMAT BINARY)"
)

# Binary COPY framing: signature + flags + header extension length, and the end marker.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" * 2
_COPY_TRAILER = b"\xff\xff"
# A row: 5 fields; trace_id (len 16 + bytes), then the block's constant 44 bytes (block_id and
# process_id with their lengths, and the length of begin_time), begin_time, len 8, end_time.
_ROW = struct.Struct(">hi16s44sqiq")
_UUID_LEN = struct.pack(">i", 16)
_TS_LEN = struct.pack(">i", 8)
_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in Unix microseconds: timestamptz's origin


def ns_to_datetime(ns: int | None) -> datetime | None:
    """Nanoseconds since the epoch as a UTC datetime, truncated to microseconds (timestamptz)."""
    if ns is None:
        return None
    return datetime.fromtimestamp(ns // 1_000_000_000, UTC).replace(
        microsecond=(ns % 1_000_000_000) // 1000
    )


def batch_params(blocks: Iterable[Block]) -> tuple[Sequence[Any], Sequence[Any], Sequence[Any]]:
    """Parameters of the three statements for ``blocks`` (deduplicated)."""
    procs: dict[uuid.UUID, list[Any]] = {}
    streams: dict[uuid.UUID, uuid.UUID] = {}
    seen: dict[uuid.UUID, Block] = {}
    for b in blocks:
        p = b.process
        row = procs.get(p.process_id)
        first_ns = p.start_time_ns or b.begin_ns
        if row is None:
            procs[p.process_id] = [p, first_ns]
        elif first_ns is not None and (row[1] is None or first_ns < row[1]) and not p.start_time_ns:
            row[1] = first_ns
        streams[b.stream_id] = p.process_id
        seen.setdefault(b.block_id, b)
    pr = [v for _, v in sorted(procs.items())]
    proc_params = [
        [p.process_id for p, _ in pr],
        [p.exe for p, _ in pr],
        [p.username for p, _ in pr],
        [p.computer for p, _ in pr],
        [p.distro for p, _ in pr],
        [p.service_name for p, _ in pr],
        [ns_to_datetime(t) for _, t in pr],
        [json.dumps(p.properties, sort_keys=True) for p, _ in pr],
    ]
    st = sorted(streams.items())
    stream_params = [STREAM_TAGS, STREAM_FORMAT, [s for s, _ in st], [p for _, p in st]]
    bl = [b for _, b in sorted(seen.items())]
    block_params = [
        [b.block_id for b in bl],
        [b.stream_id for b in bl],
        [b.process.process_id for b in bl],
        [ns_to_datetime(b.begin_ns) for b in bl],
        [ns_to_datetime(b.end_ns) for b in bl],
        [b.begin_ns for b in bl],
        [b.end_ns for b in bl],
        [b.nb_spans for b in bl],
        [b.nb_rejected for b in bl],
        [len(b.payload) for b in bl],
        [b.object_path for b in bl],
    ]
    return proc_params, stream_params, block_params


def trace_copy_data(blocks: Iterable[Block], inserted: set[uuid.UUID]) -> bytes | None:
    """Binary ``COPY`` data of the trace index rows of the ``inserted`` blocks (None: no rows).

    Timestamps are truncated to microseconds like every other ``timestamptz`` we write.
    """
    parts: list[bytes] = []
    done: set[uuid.UUID] = set()
    pack = _ROW.pack
    for b in blocks:
        if b.block_id not in inserted or b.block_id in done or not b.traces:
            continue
        done.add(b.block_id)
        mid = _UUID_LEN + b.block_id.bytes + _UUID_LEN + b.process.process_id.bytes + _TS_LEN
        parts.extend(
            pack(5, 16, tid, mid, st // 1000 - _PG_EPOCH_US, 8, en // 1000 - _PG_EPOCH_US)
            for tid, (st, en) in b.traces.items()
        )
    if not parts:
        return None
    return b"".join((_COPY_HEADER, *parts, _COPY_TRAILER))


def write_blocks(
    conn: psycopg.Connection, blocks: Sequence[Block], *, trace_index: bool = True
) -> None:
    """Insert the rows of ``blocks`` in one transaction (payloads must already be stored)."""
    if not blocks:
        return
    pp, sp, bp = batch_params(blocks)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(SQL_PROCESSES, pp)
        cur.execute(SQL_STREAMS, sp)
        cur.execute(SQL_BLOCKS, bp)
        if not trace_index:
            return
        data = trace_copy_data(blocks, {r[0] for r in cur.fetchall()})
        if data is not None:
            with cur.copy(SQL_TRACE_COPY) as cp:
                cp.write(data)


async def write_blocks_async(
    conn: psycopg.AsyncConnection, blocks: Sequence[Block], *, trace_index: bool = True
) -> None:
    """:func:`write_blocks` on an asynchronous connection."""
    if not blocks:
        return
    pp, sp, bp = batch_params(blocks)
    async with conn.transaction(), conn.cursor() as cur:
        await cur.execute(SQL_PROCESSES, pp)
        await cur.execute(SQL_STREAMS, sp)
        await cur.execute(SQL_BLOCKS, bp)
        if not trace_index:
            return
        data = trace_copy_data(blocks, {r[0] for r in await cur.fetchall()})
        if data is not None:
            async with cur.copy(SQL_TRACE_COPY) as cp:
                await cp.write(data)
