"""The receiver process: HTTP and gRPC transports over one :class:`Ingestor`, one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field

import grpc
import psycopg
from aiohttp import web

from otelspans_fdw import db
from otelspans_fdw.ingest.grpc_service import make_server
from otelspans_fdw.ingest.http import make_app, make_metrics_app
from otelspans_fdw.ingest.pipeline import Ingestor, Limits
from otelspans_fdw.objstore import open_store

__all__ = ["Receiver", "ReceiverConfig", "serve"]

log = logging.getLogger(__name__)


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v else default


def _env_on(name: str, default: bool) -> bool:
    v = (os.environ.get(name) or "").strip().lower()
    return default if not v else v not in ("0", "off", "false", "no")


@dataclass
class ReceiverConfig:
    """Receiver settings; defaults come from ``OTELSPANS_*`` environment variables."""

    host: str = field(default_factory=lambda: os.environ.get("OTELSPANS_HOST", "127.0.0.1"))
    http_port: int = field(default_factory=lambda: _env_int("OTELSPANS_HTTP_PORT", 4318))
    grpc_port: int = field(default_factory=lambda: _env_int("OTELSPANS_GRPC_PORT", 4317))
    dsn: str = field(default_factory=db.default_dsn)
    store_url: str | None = None
    durable: bool = True
    token: str | None = field(default_factory=lambda: os.environ.get("OTELSPANS_TOKEN") or None)
    limits: Limits = field(default_factory=Limits)
    migrate: bool = True
    #: write ``otel_trace_blocks`` (trace lookup across processes); off only to measure its cost
    trace_index: bool = field(default_factory=lambda: _env_on("OTELSPANS_TRACE_INDEX", True))
    #: concurrent group-commit transactions (see :mod:`otelspans_fdw.ingest.groupcommit`)
    commit_lanes: int = field(default_factory=lambda: _env_int("OTELSPANS_COMMIT_LANES", 2))
    #: a second port serving only ``GET /metrics`` (-1: none; ``/metrics`` is on the HTTP port)
    metrics_port: int = field(default_factory=lambda: _env_int("OTELSPANS_METRICS_PORT", -1))


class Receiver:
    """A running receiver (use :meth:`start` / :meth:`stop` inside an event loop)."""

    def __init__(self, config: ReceiverConfig):
        self.config = config
        store_opts = (
            {"durable": config.durable} if not (config.store_url or "").startswith("s3://") else {}
        )
        self.store = open_store(config.store_url, **store_opts)
        self.ingestor = Ingestor(
            self.store,
            config.dsn,
            config.limits,
            trace_index=config.trace_index,
            commit_lanes=config.commit_lanes,
        )
        self._runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self.metrics_port = -1
        self._grpc: grpc.aio.Server | None = None
        self.http_port = 0
        self.grpc_port = 0

    async def start(self) -> None:
        cfg = self.config
        if cfg.migrate:
            await asyncio.to_thread(self._migrate)
        await self.ingestor.start()
        self._runner = web.AppRunner(
            make_app(self.ingestor, token=cfg.token),
            access_log=None,
            auto_decompress=False,
            # aiohttp closes a connection whose next request's headers are not complete this
            # long after the connection (or its previous response): the header deadline.
            keepalive_timeout=cfg.limits.header_timeout,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.host, cfg.http_port, backlog=1024)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.http_port = sock.getsockname()[1]
        if cfg.grpc_port >= 0:
            self._grpc, self.grpc_port = make_server(
                self.ingestor, cfg.host, cfg.grpc_port, token=cfg.token
            )
            await self._grpc.start()
        if cfg.metrics_port >= 0:
            self._metrics_runner = web.AppRunner(make_metrics_app(self.ingestor), access_log=None)
            await self._metrics_runner.setup()
            msite = web.TCPSite(self._metrics_runner, cfg.host, cfg.metrics_port)
            await msite.start()
            self.metrics_port = msite._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info(
            "otelspans receiver: http %s:%d, grpc %s:%d, store %s",
            cfg.host,
            self.http_port,
            cfg.host,
            self.grpc_port,
            self.store.url,
        )

    def _migrate(self) -> None:
        with db.connect(self.config.dsn) as conn:
            db.migrate(conn)
            _record_store(conn, self.store.url)

    async def stop(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(grace=2)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        await self.ingestor.close()


async def _serve(config: ReceiverConfig, ready: asyncio.Event | None = None) -> None:
    receiver = Receiver(config)
    await receiver.start()
    # Machine-readable line for supervisors and tests that ask for port 0.
    print(
        f"otelspans receiver listening http={receiver.http_port} grpc={receiver.grpc_port}"
        + (f" metrics={receiver.metrics_port}" if receiver.metrics_port >= 0 else ""),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await receiver.stop()


def serve(config: ReceiverConfig) -> None:
    """Run a receiver until SIGINT/SIGTERM."""
    asyncio.run(_serve(config))


def _record_store(conn: psycopg.Connection, url: str) -> None:
    """Tell wrappers where blocks are written (first receiver wins; warn on disagreement)."""
    recorded = db.record_setting(conn, db.STORE_URL_SETTING, url)
    if recorded != url:
        log.warning(
            "the metadata database records store %s but this receiver writes to %s: queries "
            "without a store option read %s",
            recorded,
            url,
            recorded,
        )
