"""OTLP/gRPC transport: ``TraceService/Export`` on grpc.aio, sharing the HTTP event loop.

grpcio handles framing and gzip (``grpc-encoding``) and enforces the body limit as
``grpc.max_receive_message_length`` (RESOURCE_EXHAUSTED).  The servicer receives the raw message
bytes and parses them with the same I/O-free decoder as HTTP, so a malformed message is an
INVALID_ARGUMENT (the generated registration would answer UNKNOWN) and admission control runs
before parsing.  Our errors map to INVALID_ARGUMENT,
UNAUTHENTICATED and UNAVAILABLE (overload, database down: retried by OTLP exporters).

Slow clients get the HTTP transport's deadlines, through grpcio's own settings where it has
them (see :func:`server_options`):

* a connection must finish the HTTP/2 handshake (preface and SETTINGS) within
  ``header_timeout`` (``grpc.server_handshake_timeout_ms``), and one with no call open is
  closed after ``header_timeout`` idle (``grpc.max_connection_idle_ms``; clients reconnect);
* a call must deliver its message, and end its half of the stream, within ``body_timeout`` of
  its headers (DEADLINE_EXCEEDED otherwise).  grpcio has no such setting for the server side,
  so ``Export`` is registered as a stream-unary handler: it is called when the headers are in
  (the wire format of a unary call is the same), and reads the one message under that deadline.
  A unary handler would only be called once the message is complete, and a stalled call would
  hold a grpcio call slot for as long as its client liked;
* dead peers are found by keepalive pings, no connection lives longer than
  ``MAX_CONNECTION_AGE`` (its open calls get ``body_timeout`` more), and one connection may
  open at most ``max_inflight_requests`` concurrent streams.

As over HTTP, the request slot is taken only when the whole message is in, so calls that are
still sending hold no slot; their bytes wait in grpcio's flow-control window (64 KiB a stream
to begin with), and ``MAX_CONCURRENT_CALLS`` bounds how many may wait at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from otelspans_fdw.exceptions import (
    AuthenticationError,
    DecodeError,
    OtelSpansError,
    PayloadTooLargeError,
    RequestTimeoutError,
)
from otelspans_fdw.ingest.auth import check_bearer
from otelspans_fdw.ingest.decode import decode_request
from otelspans_fdw.ingest.pipeline import Ingestor, Limits

__all__ = ["SERVICE_NAME", "TraceService", "make_server", "server_options"]

SERVICE_NAME = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name

#: seconds a connection may live; then GOAWAY, and its open calls get ``body_timeout`` more
MAX_CONNECTION_AGE = 30 * 60.0
#: seconds between the server's keepalive pings on a quiet connection, and for the answer
KEEPALIVE_TIME, KEEPALIVE_TIMEOUT = 60.0, 20.0
#: calls grpcio holds at once (those still sending included); our admission bounds the rest
MAX_CONCURRENT_CALLS = 4096


def _code(err: OtelSpansError) -> grpc.StatusCode:
    if isinstance(err, RequestTimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(err, PayloadTooLargeError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(err, DecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(err, AuthenticationError):
        return grpc.StatusCode.UNAUTHENTICATED
    return grpc.StatusCode.UNAVAILABLE


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    """The OTLP trace service backed by an :class:`Ingestor`."""

    def __init__(self, ingestor: Ingestor, token: str | None = None):
        self.ingestor = ingestor
        self.token = token

    async def _one_message(self, context: grpc.aio.ServicerContext) -> bytes:
        """The call's one message and the end of its stream, within ``body_timeout``."""
        timeout = self.ingestor.limits.body_timeout
        got = False
        try:
            async with asyncio.timeout(timeout):
                request = await context.read()
                if request is grpc.aio.EOF:
                    raise DecodeError("Export call ended without a request message")
                got = True
                if await context.read() is not grpc.aio.EOF:
                    raise DecodeError(
                        "Export takes exactly one request message",
                        hint="Send each ExportTraceServiceRequest in its own unary call.",
                    )
        except TimeoutError:
            raise RequestTimeoutError(
                f"request {'stream not ended' if got else 'message not received'} within "
                f"{timeout:g} s",
                hint="Send the request faster, or raise the receiver's --body-timeout.",
            ) from None
        return request

    async def Export(
        self,
        request_iterator: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        del request_iterator  # read through the context, under a deadline
        try:
            with self.ingestor.metrics.observe("grpc") as record:
                md = dict(context.invocation_metadata() or ())
                check_bearer(self.token, md.get("authorization"))
                request = await self._one_message(context)
                with self.ingestor.admission.admit(len(request)):
                    record.decoded = decode_request(request)
                    return await self.ingestor.store_decoded(record.decoded)
        except OtelSpansError as e:
            await context.abort(_code(e), str(e))
            raise  # unreachable: abort raises


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def server_options(limits: Limits) -> list[tuple[str, int]]:
    """grpcio channel arguments for the receiver's limits (see the module docstring)."""
    return [
        ("grpc.max_receive_message_length", limits.max_body),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
        ("grpc.so_reuseport", 0),
        ("grpc.server_handshake_timeout_ms", _ms(limits.header_timeout)),
        ("grpc.max_connection_idle_ms", _ms(limits.header_timeout)),
        ("grpc.max_connection_age_ms", _ms(MAX_CONNECTION_AGE)),
        ("grpc.max_connection_age_grace_ms", _ms(limits.body_timeout)),
        ("grpc.keepalive_time_ms", _ms(KEEPALIVE_TIME)),
        ("grpc.keepalive_timeout_ms", _ms(KEEPALIVE_TIMEOUT)),
        ("grpc.max_concurrent_streams", limits.max_inflight_requests),
    ]


def make_server(
    ingestor: Ingestor, host: str, port: int, *, token: str | None = None
) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server (not started) and the port it bound (``port`` 0 picks a free one)."""
    server = grpc.aio.server(
        options=server_options(ingestor.limits),
        maximum_concurrent_rpcs=MAX_CONCURRENT_CALLS,
    )
    servicer = TraceService(ingestor, token)
    handler = grpc.stream_unary_rpc_method_handler(
        servicer.Export,
        request_deserializer=None,  # raw bytes: parsed by decode_request
        response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"Export": handler}),)
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    return server, bound
