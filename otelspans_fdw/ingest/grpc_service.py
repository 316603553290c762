"""OTLP/gRPC transport: ``TraceService/Export`` on grpc.aio, sharing the HTTP event loop.

grpcio handles framing and gzip (``grpc-encoding``) and enforces the body limit as
``grpc.max_receive_message_length`` (RESOURCE_EXHAUSTED).  The servicer receives the raw message
bytes and parses them with the same I/O-free decoder as HTTP, so a malformed message is an
INVALID_ARGUMENT (the generated registration would answer UNKNOWN) and admission control runs
before parsing.  Our errors map to INVALID_ARGUMENT,
UNAUTHENTICATED and UNAVAILABLE (overload, database down: retried by OTLP exporters).
"""

from __future__ import annotations

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from otelspans_fdw.exceptions import (
    AuthenticationError,
    DecodeError,
    OtelSpansError,
    PayloadTooLargeError,
)
from otelspans_fdw.ingest.auth import check_bearer
from otelspans_fdw.ingest.decode import decode_request
from otelspans_fdw.ingest.pipeline import Ingestor

__all__ = ["SERVICE_NAME", "TraceService", "make_server"]

SERVICE_NAME = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name


def _code(err: OtelSpansError) -> grpc.StatusCode:
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

    async def Export(
        self,
        request: bytes,
        context: grpc.aio.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        try:
            with self.ingestor.metrics.observe("grpc") as record:
                md = dict(context.invocation_metadata() or ())
                check_bearer(self.token, md.get("authorization"))
                with self.ingestor.admission.admit(len(request)):
                    record.decoded = decode_request(request)
                    return await self.ingestor.store_decoded(record.decoded)
        except OtelSpansError as e:
            await context.abort(_code(e), str(e))
            raise  # unreachable: abort raises


def make_server(
    ingestor: Ingestor, host: str, port: int, *, token: str | None = None
) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server (not started) and the port it bound (``port`` 0 picks a free one)."""
    limit = ingestor.limits.max_body
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", 4 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=ingestor.limits.max_inflight_requests * 2,
    )
    servicer = TraceService(ingestor, token)
    handler = grpc.unary_unary_rpc_method_handler(
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
