"""Slow and stalled gRPC clients cannot starve the OpenTelemetry SDK's gRPC exporter.

Bounded: 150 stalled calls (real grpcio clients, each on its own connection, that send their
headers and then nothing, or the message but never the end of their stream) and 100 raw TCP
connections stuck in the HTTP/2 handshake, for a few seconds, against a receiver with short
deadlines and 8 request slots.  The SDK's exports sent meanwhile must all succeed, and the
receiver must end the stalled calls and connections near their deadlines.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from ingest_helpers import block_rows, make_request
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.sdk.trace.export import SpanExportResult
from test_ingest_receiver import record_spans

from otelspans_fdw.ingest.grpc_service import SERVICE_NAME

DEADLINE = 2.0
NO_MESSAGE = 100  # headers, then nothing
NO_END = 50  # the message, then never the end of the stream
HANDSHAKE = 100  # TCP connections: nothing, or half the HTTP/2 preface
METHOD = f"/{SERVICE_NAME}/Export"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


async def _stalled_call(target: str, send_message: bool, release: asyncio.Event) -> Any:
    """(seconds until the call ended, its status code, its details)."""
    # A local subchannel pool: a connection of its own, as separate clients would have.
    async with grpc.aio.insecure_channel(
        target, options=[("grpc.use_local_subchannel_pool", 1)]
    ) as ch:
        body = make_request(1, service="stalled").SerializeToString()

        async def requests():
            if send_message:
                yield body
            await release.wait()  # never ends its half of the stream before the server acts

        call = ch.stream_unary(METHOD, request_serializer=None, response_deserializer=None)
        t0 = time.monotonic()
        try:
            await call(requests(), timeout=DEADLINE * 5)
            return time.monotonic() - t0, grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as e:
            return time.monotonic() - t0, e.code(), e.details()


async def _stalled_handshake(port: int, preface: bytes, stop: float) -> tuple[float, bool]:
    """(seconds until the server closed the connection, whether it did before ``stop``)."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(preface)
    await writer.drain()
    closed = False
    try:
        while time.monotonic() < stop:
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.25)
            except TimeoutError:
                continue
            if not data:
                closed = True
                break
    except (ConnectionError, OSError):
        closed = True
    finally:
        writer.close()
    return time.monotonic() - t0, closed


def _exports(target: str, n: int) -> list[SpanExportResult]:
    exporter = GrpcExporter(endpoint=target, insecure=True, timeout=10)
    results = []
    try:
        for i in range(n):
            results.append(exporter.export(record_spans(f"legit-{i}", 1000 + i)))
            time.sleep(0.05)
    finally:
        exporter.shutdown()
    return results


async def _scenario(rcv: Any) -> tuple[list, list, list, list]:
    release = asyncio.Event()
    stop = time.monotonic() + DEADLINE * 4
    calls = [
        asyncio.create_task(_stalled_call(rcv.grpc_target, i >= NO_MESSAGE, release))
        for i in range(NO_MESSAGE + NO_END)
    ]
    handshakes = [
        asyncio.create_task(
            _stalled_handshake(
                rcv.grpc_port, b"" if i % 2 else PREFACE[:10] if i % 4 else PREFACE, stop
            )
        )
        for i in range(HANDSHAKE)
    ]
    await asyncio.sleep(0.5)  # the stalled clients are in before the legitimate one
    legit = await asyncio.to_thread(_exports, rcv.grpc_target, 20)
    done_calls = await asyncio.gather(*calls)
    release.set()
    after = await asyncio.to_thread(_exports, rcv.grpc_target, 1)
    return done_calls, await asyncio.gather(*handshakes), legit, after


def test_stalled_grpc_clients_do_not_starve_sdk_exports(receiver_factory) -> None:
    rcv = receiver_factory(
        "--max-inflight",
        "8",
        "--header-timeout",
        str(DEADLINE),
        "--body-timeout",
        str(DEADLINE),
    )
    calls, handshakes, legit, after = asyncio.run(_scenario(rcv))
    assert legit == [SpanExportResult.SUCCESS] * 20
    assert after == [SpanExportResult.SUCCESS]
    assert len(block_rows(rcv.dsn)) == 21  # the stalled calls stored nothing

    # Every stalled call was ended by the server's read deadline, not by the client's own.
    codes = [(code, details.split(" within")[0]) for _, code, details in calls]
    assert (
        codes[:NO_MESSAGE]
        == [(grpc.StatusCode.DEADLINE_EXCEEDED, "request message not received")] * NO_MESSAGE
    )
    assert (
        codes[NO_MESSAGE:]
        == [(grpc.StatusCode.DEADLINE_EXCEEDED, "request stream not ended")] * NO_END
    )
    took = sorted(t for t, _, _ in calls)
    assert took[0] >= DEADLINE - 0.5 and took[-1] < DEADLINE * 3, (took[:3], took[-3:])

    # Connections stuck in the handshake (nothing, half the preface, no SETTINGS) are closed.
    assert all(closed for _, closed in handshakes), sum(not c for _, c in handshakes)
    took = sorted(t for t, _ in handshakes)
    assert took[0] >= DEADLINE - 0.5 and took[-1] < DEADLINE * 4 - 0.2, (took[:3], took[-3:])


def test_idle_grpc_connection_is_closed(receiver_factory) -> None:
    """A connection that finished its handshake and opens no call is closed after the
    idle deadline (``--header-timeout``), with a GOAWAY the client's channel reconnects on."""
    rcv = receiver_factory("--header-timeout", str(DEADLINE))

    async def idle() -> tuple[float, bool]:
        stop = time.monotonic() + DEADLINE * 4
        return await _stalled_handshake(rcv.grpc_port, PREFACE + EMPTY_SETTINGS, stop)

    took, closed = asyncio.run(idle())
    assert closed and DEADLINE - 0.5 <= took < DEADLINE * 4 - 0.2, took


def test_export_takes_one_message(receiver) -> None:
    """Export is unary: a client stream of two messages, or of none, is INVALID_ARGUMENT."""
    body = make_request(1, service="twice").SerializeToString()
    with grpc.insecure_channel(receiver.grpc_target) as ch:
        call = ch.stream_unary(METHOD, request_serializer=None, response_deserializer=None)
        for messages, says in (([body, body], "exactly one"), ([], "without a request")):
            with pytest.raises(grpc.RpcError) as e:
                call(iter(messages), timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
            assert says in e.value.details(), e.value.details()
    assert block_rows(receiver.dsn) == []
