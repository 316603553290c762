"""The transport-independent ingestion path: admit, decode, store payloads, commit metadata.

Order matters for crash safety: every payload is in the object store (create-only, atomic)
before the transaction that references it commits, and the client hears success only after
that commit.  A crash in between leaves at most orphan payloads, which
:func:`otelspans_fdw.ingest.cleanup.remove_orphans` deletes; metadata never points to a missing
payload.

Admission control bounds memory: at most ``max_inflight_requests`` requests and
``max_inflight_bytes`` of bodies are being worked on; beyond that requests are refused at once
(HTTP 429 / gRPC UNAVAILABLE, both retried by OTLP exporters) instead of queueing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from otelspans_fdw.exceptions import OverloadedError
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


class Admission:
    """Counts in-flight requests and bytes; refuses beyond the limits (never queues)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.requests = 0
        self.bytes = 0
        self.refused = 0

    @contextlib.contextmanager
    def admit(self, size_hint: int = 0) -> Iterator[None]:
        if (
            self.requests >= self.limits.max_inflight_requests
            or self.bytes + size_hint > self.limits.max_inflight_bytes
        ):
            self.refused += 1
            raise OverloadedError(
                "receiver overloaded: too many requests in flight",
                hint=f"Retry after {self.limits.retry_after_seconds} s.",
            )
        self.requests += 1
        self.bytes += size_hint
        try:
            yield
        finally:
            self.requests -= 1
            self.bytes -= size_hint


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
            await asyncio.gather(
                *(
                    asyncio.to_thread(self.store.put_if_absent, b.object_path, b.payload)
                    for b in decoded.blocks
                )
            )
            await self.committer.commit(decoded.blocks)
            self.spans_accepted += decoded.nb_spans
        return response_for(decoded)

    async def export(self, request: ExportTraceServiceRequest) -> ExportTraceServiceResponse:
        """The whole path for an already-parsed request (gRPC)."""
        return await self.store_decoded(split_blocks(request))
