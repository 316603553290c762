"""Writing the metadata rows of stored blocks: one transaction per batch, sync or async.

Rows are built once (:func:`batch_params`) and inserted with ``unnest`` arrays, three statements
per batch whatever its size, so that many concurrent requests can share one commit (see
:mod:`otelspans_fdw.ingest.groupcommit`).  Every insert is ``ON CONFLICT DO NOTHING``: ids are
deterministic, so retries and concurrent receivers converge; keys are sorted so that two
receivers committing overlapping batches lock rows in the same order and never deadlock.

The trace index (``otel_trace_blocks``, issue 6: one row per block, a ``uuid[]`` of its trace
ids under GIN) is written in the same transaction with one binary ``COPY`` whose rows, arrays
included, are built here with :mod:`struct` and ``bytes.join`` (no per-value adaptation, no
per-id Python object), and only for the blocks that the ``INSERT ... RETURNING`` of this
transaction really inserted: ``COPY`` has no ``ON CONFLICT``, and a retried or concurrently
sent block must neither fail the batch on the primary key nor be indexed twice.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from itertools import chain
from typing import Any

import psycopg

from otelspans_fdw.ingest.decode import Block
from otelspans_fdw.ingest.identity import STREAM_FORMAT, STREAM_TAGS

__all__ = [
    "SQL_BLOCKS",
    "SQL_CLEAN_TRACE_INDEX",
    "SQL_PROCESSES",
    "SQL_STREAMS",
    "SQL_TRACE_COPY",
    "batch_params",
    "clean_trace_index",
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

SQL_TRACE_COPY = "COPY otel_trace_blocks (block_id, trace_ids, bounds) FROM STDIN (FORMAT BINARY)"
SQL_CLEAN_TRACE_INDEX = "SELECT gin_clean_pending_list('otel_trace_blocks_trace'::regclass)"

# Binary COPY framing: signature + flags + header extension length, and the end marker.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" * 2
_COPY_TRAILER = b"\xff\xff"
# A row starts with its field count (3) and the length of block_id (16).
_ROW_START = struct.pack(">hi", 3, 16)
_LEN16 = struct.pack(">i", 16)
# A one-dimensional uuid[] without nulls: field length, ndim, has-nulls flag, element type oid
# (uuid = 2950), dimension length, lower bound (1), then the length of the first element (the
# others are joined with _LEN16: one join for the whole array).
_ARRAY_HEAD = struct.Struct(">iiiiiii")
_UUID_OID = 2950


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


def trace_copy_data(blocks: Iterable[Block], inserted: set[uuid.UUID]) -> tuple[bytes, int] | None:
    """Binary ``COPY`` data of the trace index rows of the ``inserted`` blocks, and the number
    of trace ids they hold (None: no rows).

    One row per block: the trace ids as a ``uuid[]`` and, in the same order, their bounds in
    nanoseconds as OTLP gives them (unsigned 64-bit, big-endian) packed in one ``bytea``, so
    PostgreSQL receives three values per block instead of five per trace, and Python packs
    them in one call with no per-value work.
    """
    parts: list[bytes] = []
    done: set[uuid.UUID] = set()
    nb_ids = 0
    for b in blocks:
        if b.block_id not in inserted or b.block_id in done or not b.traces:
            continue
        done.add(b.block_id)
        tr = b.traces
        n = len(tr)
        nb_ids += n
        ids = _LEN16.join(tr)
        bounds = struct.pack(f">{2 * n}Q", *chain.from_iterable(tr.values()))
        parts += (
            _ROW_START,
            b.block_id.bytes,
            _ARRAY_HEAD.pack(20 + 20 * n, 1, 0, _UUID_OID, n, 1, 16),
            ids,
            struct.pack(">i", 16 * n),
            bounds,
        )
    if not parts:
        return None
    return b"".join((_COPY_HEADER, *parts, _COPY_TRAILER)), nb_ids


def write_blocks(
    conn: psycopg.Connection, blocks: Sequence[Block], *, trace_index: bool = True
) -> int:
    """Insert the rows of ``blocks`` in one transaction (payloads must already be stored).

    Returns the number of trace ids added to the trace index (what its GIN pending list grew
    by, see :func:`clean_trace_index`).
    """
    if not blocks:
        return 0
    pp, sp, bp = batch_params(blocks)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(SQL_PROCESSES, pp)
        cur.execute(SQL_STREAMS, sp)
        cur.execute(SQL_BLOCKS, bp)
        if not trace_index:
            return 0
        rows = trace_copy_data(blocks, {r[0] for r in cur.fetchall()})
        if rows is None:
            return 0
        with cur.copy(SQL_TRACE_COPY) as cp:
            cp.write(rows[0])
    return rows[1]


async def write_blocks_async(
    conn: psycopg.AsyncConnection, blocks: Sequence[Block], *, trace_index: bool = True
) -> int:
    """:func:`write_blocks` on an asynchronous connection."""
    if not blocks:
        return 0
    pp, sp, bp = batch_params(blocks)
    async with conn.transaction(), conn.cursor() as cur:
        await cur.execute(SQL_PROCESSES, pp)
        await cur.execute(SQL_STREAMS, sp)
        await cur.execute(SQL_BLOCKS, bp)
        if not trace_index:
            return 0
        rows = trace_copy_data(blocks, {r[0] for r in await cur.fetchall()})
        if rows is None:
            return 0
        async with cur.copy(SQL_TRACE_COPY) as cp:
            await cp.write(rows[0])
    return rows[1]


async def clean_trace_index(conn: psycopg.AsyncConnection) -> int:
    """Merge the trace index's GIN pending list into its tree; returns the pages merged.

    With ``fastupdate`` each insert only appends its ids to the pending list, and whichever
    insert finds the list over ``gin_pending_list_limit`` merges all of it, inside its own
    transaction: a request acknowledged tens of milliseconds late.  The receiver calls this
    from a connection of its own every few tens of thousands of ids instead (see
    :class:`otelspans_fdw.ingest.groupcommit.GroupCommitter`), so merges stay off the path of
    acknowledgements.  Lookups are complete either way: GIN scans read the pending list too.
    Requires owning the index (as for ``VACUUM``).
    """
    cur = await conn.execute(SQL_CLEAN_TRACE_INDEX)
    row = await cur.fetchone()
    return int(row[0]) if row else 0
