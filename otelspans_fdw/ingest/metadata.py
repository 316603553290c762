"""Writing the metadata rows of stored blocks: one transaction per batch, sync or async.

Rows are built once (:func:`batch_params`) and inserted with ``unnest`` arrays, three statements
per batch whatever its size, so that many concurrent requests can share one commit (see
:mod:`otelspans_fdw.ingest.groupcommit`).  Every insert is ``ON CONFLICT DO NOTHING``: ids are
deterministic, so retries and concurrent receivers converge; keys are sorted so that two
receivers committing overlapping batches lock rows in the same order and never deadlock.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg

from otelspans_fdw.ingest.decode import Block
from otelspans_fdw.ingest.identity import STREAM_FORMAT, STREAM_TAGS

__all__ = ["SQL_BLOCKS", "SQL_PROCESSES", "SQL_STREAMS", "batch_params", "write_blocks"]

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
"""


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


def write_blocks(conn: psycopg.Connection, blocks: Sequence[Block]) -> None:
    """Insert the rows of ``blocks`` in one transaction (payloads must already be stored)."""
    if not blocks:
        return
    pp, sp, bp = batch_params(blocks)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(SQL_PROCESSES, pp)
        cur.execute(SQL_STREAMS, sp)
        cur.execute(SQL_BLOCKS, bp)


async def write_blocks_async(conn: psycopg.AsyncConnection, blocks: Sequence[Block]) -> None:
    """:func:`write_blocks` on an asynchronous connection."""
    if not blocks:
        return
    pp, sp, bp = batch_params(blocks)
    async with conn.transaction(), conn.cursor() as cur:
        await cur.execute(SQL_PROCESSES, pp)
        await cur.execute(SQL_STREAMS, sp)
        await cur.execute(SQL_BLOCKS, bp)
