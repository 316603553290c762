"""The receiver's own Prometheus metrics (``GET /metrics``), one registry per receiver.

Each :class:`ReceiverMetrics` owns a private :class:`~prometheus_client.CollectorRegistry`
instead of the process-global one, so several receivers in one process (tests, embedding) keep
separate numbers and never fail on duplicate registration.  Every label value is created at
start-up, so a scrape shows explicit zeros and a rate over a new reason does not start late.

Counting happens once per request in the transports through :meth:`ReceiverMetrics.observe`:

* a request is *accepted* when it was acknowledged (its rows committed); its valid spans count
  as accepted and its invalid ones (reported in OTLP ``partial_success``) as rejected with
  reason ``invalid`` (they are stored but never queryable);
* a request is *rejected* with the reason of the error it got (see :data:`REQUEST_REASONS`);
  when it failed after decoding (database or store down) its spans are counted as rejected with
  the same reason, so ``spans_accepted`` is exactly what the exporters were told was stored.

gRPC messages over the size limit are refused by grpcio before our handler runs, so they do not
appear here (HTTP ones do, as ``too_large``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from otelspans_fdw.exceptions import (
    AuthenticationError,
    DecodeError,
    MetadataError,
    OverloadedError,
    PayloadTooLargeError,
    RejectedDataError,
    RequestTimeoutError,
    StoreError,
    UnsupportedMediaTypeError,
)
from otelspans_fdw.ingest.decode import DecodedRequest

__all__ = [
    "PREFIX",
    "REQUEST_REASONS",
    "SPAN_REASONS",
    "TRANSPORTS",
    "ReceiverMetrics",
    "RequestRecord",
    "reason_of",
]

PREFIX = "otelspans_receiver_"
TRANSPORTS = ("http", "grpc")
#: Why a whole request was refused, in the order :func:`reason_of` tests the error classes.
REQUEST_REASONS = (
    "malformed",
    "rows_refused",
    "unsupported_media_type",
    "too_large",
    "timeout",
    "unauthorized",
    "overloaded",
    "database_unavailable",
    "store_unavailable",
    "cancelled",
    "internal",
)
#: Why spans were not accepted: ``invalid`` (partial_success) or the failure of their request.
SPAN_REASONS = (
    "invalid",
    "rows_refused",
    "database_unavailable",
    "store_unavailable",
    "cancelled",
    "internal",
)

# Receiver latencies span sub-millisecond (small request, warm) to seconds (group commit under
# load, slow store): finer low buckets than prometheus_client's defaults.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_REASON_OF: tuple[tuple[type[BaseException], str], ...] = (
    (PayloadTooLargeError, "too_large"),  # before DecodeError: it is a subclass
    (RejectedDataError, "rows_refused"),  # likewise
    (RequestTimeoutError, "timeout"),
    (UnsupportedMediaTypeError, "unsupported_media_type"),
    (DecodeError, "malformed"),
    (AuthenticationError, "unauthorized"),
    (OverloadedError, "overloaded"),
    (MetadataError, "database_unavailable"),
    (StoreError, "store_unavailable"),
    (asyncio.CancelledError, "cancelled"),
)


def reason_of(err: BaseException) -> str:
    """The ``reason`` label of a refused request."""
    return next((r for cls, r in _REASON_OF if isinstance(err, cls)), "internal")


@dataclass(slots=True)
class RequestRecord:
    """Filled in by a transport while handling one request (what was decoded, if anything)."""

    decoded: DecodedRequest | None = None


class ReceiverMetrics:
    """The counters, histogram and gauges of one receiver, in their own registry."""

    def __init__(
        self,
        inflight_requests: Callable[[], float] | None = None,
        inflight_bytes: Callable[[], float] | None = None,
    ) -> None:
        """``inflight_*``: callables read at scrape time (the admission controller's counts)."""
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests_accepted = Counter(
            PREFIX + "requests_accepted",
            "Export requests acknowledged (their spans committed).",
            ["transport"],
            registry=reg,
        )
        self.requests_rejected = Counter(
            PREFIX + "requests_rejected",
            "Export requests refused, by reason.",
            ["transport", "reason"],
            registry=reg,
        )
        self.spans_accepted = Counter(
            PREFIX + "spans_accepted",
            "Valid spans in acknowledged requests.",
            ["transport"],
            registry=reg,
        )
        self.spans_rejected = Counter(
            PREFIX + "spans_rejected",
            "Spans not accepted: invalid (partial_success) or in a request that failed after "
            "decoding.",
            ["transport", "reason"],
            registry=reg,
        )
        self.blocks_stored = Counter(
            PREFIX + "blocks_stored",
            "Blocks (ResourceSpans payloads) acknowledged, retries included.",
            ["transport"],
            registry=reg,
        )
        self.stored_bytes = Counter(
            PREFIX + "stored_bytes",
            "Payload bytes of acknowledged blocks, retries included.",
            ["transport"],
            registry=reg,
        )
        self.latency = Histogram(
            PREFIX + "request_duration_seconds",
            "Time from request start to response, accepted or not.",
            ["transport"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.inflight_requests = Gauge(
            PREFIX + "inflight_requests", "Requests admitted and not answered yet.", registry=reg
        )
        self.inflight_bytes = Gauge(
            PREFIX + "inflight_bytes", "Declared body bytes of in-flight requests.", registry=reg
        )
        if inflight_requests is not None:
            self.inflight_requests.set_function(inflight_requests)
        if inflight_bytes is not None:
            self.inflight_bytes.set_function(inflight_bytes)
        for t in TRANSPORTS:
            self.requests_accepted.labels(t)
            self.spans_accepted.labels(t)
            self.blocks_stored.labels(t)
            self.stored_bytes.labels(t)
            self.latency.labels(t)
            for r in REQUEST_REASONS:
                self.requests_rejected.labels(t, r)
            for r in SPAN_REASONS:
                self.spans_rejected.labels(t, r)

    def exposition(self) -> bytes:
        """The Prometheus text format of this registry."""
        return generate_latest(self.registry)

    @contextlib.contextmanager
    def observe(self, transport: str) -> Iterator[RequestRecord]:
        """Count one request: accepted if the block exits normally, else by the error's reason.

        The transport sets ``record.decoded`` once the body is decoded; the error propagates.
        """
        record = RequestRecord()
        t0 = time.perf_counter()
        try:
            yield record
        except BaseException as e:
            reason = reason_of(e)
            self.requests_rejected.labels(transport, reason).inc()
            d = record.decoded
            if d is not None and d.nb_spans and reason in SPAN_REASONS:
                self.spans_rejected.labels(transport, reason).inc(d.nb_spans)
            raise
        else:
            self.requests_accepted.labels(transport).inc()
            d = record.decoded
            if d is not None:
                rejected = d.nb_rejected
                self.spans_accepted.labels(transport).inc(d.nb_spans - rejected)
                if rejected:
                    self.spans_rejected.labels(transport, "invalid").inc(rejected)
                self.blocks_stored.labels(transport).inc(len(d.blocks))
                self.stored_bytes.labels(transport).inc(d.payload_size)
        finally:
            self.latency.labels(transport).observe(time.perf_counter() - t0)
