"""The transport-independent ingestion path: admit, decode, store payloads, commit metadata.

Order matters for crash safety: every payload is in the object store (create-only, atomic)
before the transaction that references it commits, and the client hears success only after
that commit.  A crash in between leaves at most orphan payloads, which
:func:`otelspans_fdw.ingest.cleanup.remove_orphans` deletes; metadata never points to a missing
payload.

Admission control bounds memory: at most ``max_inflight_requests`` requests and
``max_inflight_bytes`` of bodies are being worked on; beyond that requests are refused at once
(HTTP 429 / gRPC UNAVAILABLE, both retried by OTLP exporters) instead of queueing.  Over HTTP
the bytes are counted as they arrive (:meth:`Admission.receiving`) and the request slot is
taken only once the whole body is in: a client sending one byte a second holds one byte of
the budget and no slot, so hundreds of them cannot lock out the others, and the deadlines
(``header_timeout``, ``body_timeout``) close them in the end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from otelspans_fdw.exceptions import OverloadedError, RejectedDataError
from otelspans_fdw.ingest.body import DEFAULT_MAX_BODY
from otelspans_fdw.ingest.decode import DecodedRequest, response_for, split_blocks
from otelspans_fdw.ingest.groupcommit import GroupCommitter
from otelspans_fdw.ingest.metrics import ReceiverMetrics
from otelspans_fdw.objstore import ObjectStore

__all__ = ["Admission", "Ingestor", "Limits"]


@dataclass(frozen=True)
class Limits:
    """Receiver limits (all configurable from ``otelspans serve``)."""

    max_body: int = DEFAULT_MAX_BODY
    max_inflight_requests: int = 64
    max_inflight_bytes: int = 256 * 1024 * 1024
    retry_after_seconds: int = 1
    #: seconds a connection may take to send a request's headers (also the idle keep-alive)
    header_timeout: float = 30.0
    #: seconds a request may take to send its body, once its headers are in
    body_timeout: float = 60.0


class Admission:
    """Counts in-flight requests and bytes; refuses beyond the limits (never queues)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.requests = 0
        self.bytes = 0
        self.refused = 0

    def _refuse(self, what: str) -> OverloadedError:
        self.refused += 1
        return OverloadedError(
            f"receiver overloaded: too many {what} in flight",
            hint=f"Retry after {self.limits.retry_after_seconds} s.",
        )

    @contextlib.contextmanager
    def admit(self, size_hint: int = 0) -> Iterator[None]:
        """A request slot, and ``size_hint`` bytes (0 when :meth:`receiving` counted them)."""
        if self.requests >= self.limits.max_inflight_requests:
            raise self._refuse("requests")
        if self.bytes + size_hint > self.limits.max_inflight_bytes:
            raise self._refuse("bytes")
        self.requests += 1
        self.bytes += size_hint
        try:
            yield
        finally:
            self.requests -= 1
            self.bytes -= size_hint

    @contextlib.contextmanager
    def receiving(self) -> Iterator[Callable[[int], None]]:
        """Count a body's bytes as they arrive: the callback takes each chunk's size and
        raises :class:`OverloadedError` once the budget is spent; all are released at exit."""
        held = 0

        def take(n: int) -> None:
            nonlocal held
            if self.bytes + n > self.limits.max_inflight_bytes:
                raise self._refuse("bytes")
            self.bytes += n
            held += n

        try:
            yield take
        finally:
            self.bytes -= held


class Ingestor:
    """Stores decoded requests: payloads to the object store, then grouped metadata commits."""

    def __init__(
        self,
        store: ObjectStore,
        dsn: str,
        limits: Limits | None = None,
        *,
        trace_index: bool = True,
        commit_lanes: int = 2,
    ):
        """``trace_index=False`` skips ``otel_trace_blocks`` (only to measure its cost)."""
        self.store = store
        self.limits = limits or Limits()
        self.admission = Admission(self.limits)
        self.committer = GroupCommitter(dsn, trace_index=trace_index, lanes=commit_lanes)
        self.metrics = ReceiverMetrics(
            lambda: self.admission.requests, lambda: self.admission.bytes
        )
        self.spans_accepted = 0

    async def start(self) -> None:
        await self.committer.start()

    async def close(self) -> None:
        await self.committer.close()

    async def store_decoded(self, decoded: DecodedRequest) -> ExportTraceServiceResponse:
        """Persist ``decoded`` and return the OTLP response to acknowledge it with."""
        if decoded.blocks:
            written = await asyncio.gather(
                *(
                    asyncio.to_thread(self.store.put_if_absent, b.object_path, b.payload)
                    for b in decoded.blocks
                )
            )
            try:
                await self.committer.commit(decoded.blocks)
            except RejectedDataError:
                # Refused for good: the payloads this request wrote must not stay behind.
                # (Equal payloads make equal rows, so no accepted request shares them.)
                new = [b.object_path for b, w in zip(decoded.blocks, written, strict=True) if w]
                await asyncio.gather(*(asyncio.to_thread(self.store.delete, p) for p in new))
                raise
            self.spans_accepted += decoded.nb_spans
        return response_for(decoded)

    async def export(self, request: ExportTraceServiceRequest) -> ExportTraceServiceResponse:
        """The whole path for an already-parsed request (gRPC)."""
        return await self.store_decoded(split_blocks(request))
