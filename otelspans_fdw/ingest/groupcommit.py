"""Group commit: concurrent requests share one metadata transaction.

Each request hands its blocks to :meth:`GroupCommitter.commit` and waits.  One task drains
everything that queued up while the previous transaction ran and writes it in a single
transaction, so the commit rate stops bounding the request rate.  A request is acknowledged only
after the transaction holding its rows committed; if the database is unreachable every waiter
gets :class:`MetadataError` (HTTP 503 / gRPC UNAVAILABLE) and the connection is rebuilt on the
next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import psycopg

from otelspans_fdw.exceptions import MetadataError
from otelspans_fdw.ingest.decode import Block
from otelspans_fdw.ingest.metadata import write_blocks_async

__all__ = ["GroupCommitter"]

log = logging.getLogger(__name__)


class GroupCommitter:
    """Batches metadata writes from concurrent requests into shared transactions."""

    def __init__(self, dsn: str, *, connect_timeout: float = 5.0, max_batch_blocks: int = 5000):
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self.max_batch_blocks = max_batch_blocks
        self._conn: psycopg.AsyncConnection | None = None
        self._pending: list[tuple[Sequence[Block], asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.transactions = 0

    async def start(self) -> None:
        """Start the commit task (connection is opened lazily, so a down database is not fatal)."""
        self._task = asyncio.create_task(self._run(), name="otelspans-group-commit")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _, fut in self._pending:
            if not fut.done():
                fut.set_exception(MetadataError("receiver shutting down"))
        self._pending.clear()
        if self._conn is not None:
            await self._conn.close()

    async def commit(self, blocks: Sequence[Block]) -> None:
        """Return once the rows of ``blocks`` are committed."""
        if not blocks:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((blocks, fut))
        self._wake.set()
        await fut

    async def _connection(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                self._conn = await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, connect_timeout=max(1, int(self.connect_timeout))
                )
            except psycopg.Error as e:
                raise MetadataError(f"metadata database unreachable: {e}") from e
        return self._conn

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

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
            batch = self._take_batch()
            live = [(b, f) for b, f in batch if not f.cancelled()]
            if not live:
                continue
            blocks = [blk for b, _ in live for blk in b]
            try:
                conn = await self._connection()
                await write_blocks_async(conn, blocks)
                self.transactions += 1
            except MetadataError as e:
                err: BaseException = e
            except psycopg.OperationalError as e:
                log.warning("metadata write failed: %s", e)
                err = MetadataError(f"metadata database unavailable: {e}")
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        await self._conn.close()
                    self._conn = None
            except Exception as e:  # a bug or constraint problem: report, keep serving
                log.exception("metadata write failed")
                err = MetadataError(f"metadata write failed: {e}")
                if self._conn is not None and self._conn.broken:
                    self._conn = None
            else:
                for _, f in live:
                    if not f.done():
                        f.set_result(None)
                continue
            for _, f in live:
                if not f.done():
                    f.set_exception(err)
