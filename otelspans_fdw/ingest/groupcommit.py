"""Group commit: concurrent requests share one metadata transaction.

Each request hands its blocks to :meth:`GroupCommitter.commit` and waits.  A writer ("lane")
drains everything that queued up while its previous transaction ran and writes it in a single
transaction, so the commit rate stops bounding the request rate.  ``lanes`` writers (each with
its own connection, default 2) run transactions concurrently: while one waits on PostgreSQL the
next batch is already being written, which keeps the receiver busy when a transaction got
longer (the trace index's COPY, issue 6).  Concurrent transactions are safe: every statement
inserts its keys in sorted order, table by table, so two of them never deadlock.

The trace index's GIN pending list is merged by a separate task on its own connection every
``clean_every_ids`` indexed trace ids (:func:`~otelspans_fdw.ingest.metadata.clean_trace_index`),
so that no group-commit transaction, hence no acknowledgement, waits for a merge.  If that fails
(e.g. the receiver's role does not own the index) the inserts merge it themselves at the
index's ``gin_pending_list_limit``, as PostgreSQL always does; nothing is lost either way.

A request is acknowledged only after the transaction holding its rows committed; if the
database is unreachable every waiter gets :class:`MetadataError` (HTTP 503 / gRPC
UNAVAILABLE) and that writer's connection is rebuilt on its next batch.

Requests fail alone.  Their rows are sanitised before they get here (see
:mod:`otelspans_fdw.otlp`), but if PostgreSQL still refuses a batch for its data (any error
but a lost connection), the batch is split in halves, each written in its own transaction, down
to the one request whose rows fail: that request gets :class:`RejectedDataError` (HTTP 400 /
gRPC INVALID_ARGUMENT, not retried: its rows would fail the same way again) and everybody else
commits.  One poison request costs about ``2 log2(batch)`` extra transactions, paid only when
it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import psycopg

from otelspans_fdw.exceptions import MetadataError, RejectedDataError
from otelspans_fdw.ingest.decode import Block
from otelspans_fdw.ingest.metadata import clean_trace_index, write_blocks_async

__all__ = ["GroupCommitter"]

log = logging.getLogger(__name__)


class GroupCommitter:
    """Batches metadata writes from concurrent requests into shared transactions."""

    def __init__(
        self,
        dsn: str,
        *,
        connect_timeout: float = 5.0,
        max_batch_blocks: int = 5000,
        trace_index: bool = True,
        lanes: int = 2,
        clean_every_ids: int = 16_384,
    ):
        """``clean_every_ids``: trace ids indexed between two merges of the GIN pending list,
        which every lookup scans (~0.2 us per pending id, so a lookup stays under ~4 ms;
        0 = leave merges to PostgreSQL at the index's 16 MB ``gin_pending_list_limit``)."""
        self.dsn = dsn
        self.lanes = max(1, lanes)
        self.trace_index = trace_index
        self.connect_timeout = connect_timeout
        self.max_batch_blocks = max_batch_blocks
        self._conns: list[psycopg.AsyncConnection | None] = [None] * self.lanes
        self._pending: list[tuple[Sequence[Block], asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.transactions = 0
        self.clean_every_ids = clean_every_ids
        self._unmerged_ids = 0
        self._cleaner: asyncio.Task[None] | None = None
        self._cleaner_conn: psycopg.AsyncConnection | None = None
        #: pending-list merges done by this receiver (exposed for tests and benchmarks)
        self.index_merges = 0

    async def start(self) -> None:
        """Start the writers (connections open lazily, so a down database is not fatal)."""
        self._tasks = [
            asyncio.create_task(self._run(i), name=f"otelspans-group-commit-{i}")
            for i in range(self.lanes)
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._cleaner is not None:  # a merge is short: let it finish rather than cancel it
            with contextlib.suppress(Exception):
                await self._cleaner
        if self._cleaner_conn is not None:
            await self._cleaner_conn.close()
        for _, fut in self._pending:
            if not fut.done():
                fut.set_exception(MetadataError("receiver shutting down"))
        self._pending.clear()
        for conn in self._conns:
            if conn is not None:
                await conn.close()

    async def commit(self, blocks: Sequence[Block]) -> None:
        """Return once the rows of ``blocks`` are committed."""
        if not blocks:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((blocks, fut))
        self._wake.set()
        await fut

    async def _connection(self, lane: int) -> psycopg.AsyncConnection:
        conn = self._conns[lane]
        if conn is None or conn.closed or conn.broken:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, connect_timeout=max(1, int(self.connect_timeout))
                )
            except psycopg.Error as e:
                raise MetadataError(f"metadata database unreachable: {e}") from e
            self._conns[lane] = conn
        return conn

    async def _drop(self, lane: int, *, only_broken: bool = False) -> None:
        conn = self._conns[lane]
        if conn is None or (only_broken and not conn.broken):
            return
        with contextlib.suppress(Exception):
            await conn.close()
        self._conns[lane] = None

    def _take_batch(self) -> list[tuple[Sequence[Block], asyncio.Future[None]]]:
        batch: list[tuple[Sequence[Block], asyncio.Future[None]]] = []
        n = 0
        while self._pending and (
            not batch or n + len(self._pending[0][0]) <= self.max_batch_blocks
        ):
            item = self._pending.pop(0)
            batch.append(item)
            n += len(item[0])
        return batch

    def _after_commit(self, added_ids: int) -> None:
        """Start a pending-list merge once enough ids were indexed and none is running."""
        self._unmerged_ids += added_ids
        if (
            self.clean_every_ids > 0
            and self._unmerged_ids >= self.clean_every_ids
            and (self._cleaner is None or self._cleaner.done())
        ):
            self._unmerged_ids = 0
            self._cleaner = asyncio.create_task(self._merge(), name="otelspans-trace-index-merge")

    async def _merge(self) -> None:
        """Merge the trace index's pending list on the cleaner's own connection."""
        try:
            if self._cleaner_conn is None or self._cleaner_conn.closed:
                self._cleaner_conn = await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, connect_timeout=max(1, int(self.connect_timeout))
                )
            await clean_trace_index(self._cleaner_conn)
            self.index_merges += 1
        except psycopg.errors.InsufficientPrivilege as e:
            log.warning("trace index: cannot merge its pending list (%s); inserts will", e)
            self.clean_every_ids = 0
        except Exception as e:  # transient: the next threshold retries on a new connection
            log.warning("trace index: pending list merge failed: %s", e)
            if self._cleaner_conn is not None:
                with contextlib.suppress(Exception):
                    await self._cleaner_conn.close()
            self._cleaner_conn = None

    async def _run(self, lane: int) -> None:
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
            batch = self._take_batch()
            live = [(b, f) for b, f in batch if not f.cancelled()]
            if not live:
                continue
            try:
                conn = await self._connection(lane)
                await self._write(conn, live)
            except MetadataError as e:
                err: BaseException = e
            except psycopg.OperationalError as e:
                log.warning("metadata write failed: %s", e)
                err = MetadataError(f"metadata database unavailable: {e}")
                await self._drop(lane)
            except Exception as e:  # a bug: report, keep serving
                log.exception("metadata write failed")
                err = MetadataError(f"metadata write failed: {e}")
                await self._drop(lane, only_broken=True)
            else:
                continue
            for _, f in live:
                if not f.done():
                    f.set_exception(err)

    async def _write(
        self,
        conn: psycopg.AsyncConnection,
        items: list[tuple[Sequence[Block], asyncio.Future[None]]],
    ) -> None:
        """Commit ``items`` together, or, if their rows fail, each half apart (recursively).

        Resolves the futures of what committed or was refused; raises only what every item
        shares (a lost connection, a bug outside the data).
        """
        blocks = [blk for b, _ in items for blk in b]
        try:
            added = await write_blocks_async(conn, blocks, trace_index=self.trace_index)
        except psycopg.OperationalError:
            raise
        except psycopg.Error as e:
            if conn.broken:
                raise
            if len(items) == 1:
                log.warning("metadata rows of a request refused: %s", e)
                fut = items[0][1]
                if not fut.done():
                    fut.set_exception(
                        RejectedDataError(
                            f"the database refuses this request's rows: {e}",
                            hint="Fix the data; retrying it unchanged fails the same way.",
                        )
                    )
                return
            half = len(items) // 2
            await self._write(conn, items[:half])
            await self._write(conn, items[half:])
            return
        self.transactions += 1
        self._after_commit(added)
        for _, f in items:
            if not f.done():
                f.set_result(None)
