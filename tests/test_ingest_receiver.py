"""The receiver for real: an `otelspans serve` subprocess, the OpenTelemetry SDK's exporters."""

from __future__ import annotations

import gzip
import json
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import psycopg
import pytest
from google.rpc import status_pb2
from ingest_helpers import (
    block_rows,
    hold_slot,
    make_request,
    resource_spans_bytes,
    stored_payloads,
)
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, StatusCode
from test_ingest_decode import otlp_json


def record_spans(service: str, pid: int):
    """Finished SDK spans of two services-worth of work (attributes, events, links, errors)."""
    mem = InMemorySpanExporter()
    tp = TracerProvider(
        resource=Resource.create(
            {
                "service.name": service,
                "process.pid": pid,
                "host.name": "test-host",
                "service.instance.id": f"{service}-{pid}",
            }
        )
    )
    tp.add_span_processor(SimpleSpanProcessor(mem))
    t = tp.get_tracer("tests.ingest", "1.0")
    with t.start_as_current_span("GET /cart", attributes={"http.method": "GET"}) as root:
        root.add_event("cache.miss", {"key": "cart:1"})
        with t.start_as_current_span("db.query", links=[Link(root.get_span_context())]) as q:
            q.set_status(StatusCode.ERROR, "timeout")
    tp.shutdown()
    return mem.get_finished_spans()


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


PB = {"Content-Type": "application/x-protobuf"}


def test_sdk_http_and_grpc_exports_are_stored_byte_for_byte(receiver) -> None:
    spans_h = record_spans("cart", 11)
    spans_g = record_spans("payments", 12)
    assert HttpExporter(endpoint=receiver.http_url).export(spans_h) == SpanExportResult.SUCCESS
    assert (
        GrpcExporter(endpoint=receiver.grpc_target, insecure=True).export(spans_g)
        == SpanExportResult.SUCCESS
    )
    expected = resource_spans_bytes(encode_spans(spans_h)) + resource_spans_bytes(
        encode_spans(spans_g)
    )
    stored = stored_payloads(receiver.store)
    rows = block_rows(receiver.dsn)
    assert len(rows) == 2
    assert sorted(stored.values()) == sorted(expected)
    for _bid, _pid, nb, rej, size, path in rows:
        assert (nb, rej) == (2, 0) and size == len(stored[path])
    with psycopg.connect(receiver.dsn) as c:
        procs = c.execute(
            "SELECT exe, computer, properties->>'otel.resource.process.pid'"
            " FROM otel_processes ORDER BY exe"
        ).fetchall()
        assert procs == [("cart", "test-host", "11"), ("payments", "test-host", "12")]
        assert c.execute(
            "SELECT count(*), min(format), min(tags[1]) FROM otel_streams"
        ).fetchone() == (2, "otlp/v1/traces", "trace")
        b, e, bn, en = c.execute(
            "SELECT begin_time, end_time, begin_time_ns, end_time_ns FROM otel_blocks"
            " JOIN otel_processes USING (process_id) WHERE exe = 'cart'"
        ).fetchone()
    assert bn == min(s.start_time for s in spans_h) and en == max(s.end_time for s in spans_h)
    assert int(b.timestamp() * 1e6) == bn // 1000 and int(e.timestamp() * 1e6) == en // 1000


def test_gzip_over_http_and_grpc(receiver) -> None:
    a, b = record_spans("gz-http", 1), record_spans("gz-grpc", 2)
    assert (
        HttpExporter(endpoint=receiver.http_url, compression=Compression.Gzip).export(a)
        == SpanExportResult.SUCCESS
    )
    assert (
        GrpcExporter(
            endpoint=receiver.grpc_target, insecure=True, compression=grpc.Compression.Gzip
        ).export(b)
        == SpanExportResult.SUCCESS
    )
    expected = resource_spans_bytes(encode_spans(a)) + resource_spans_bytes(encode_spans(b))
    assert sorted(stored_payloads(receiver.store).values()) == sorted(expected)


def test_json_encoding_stores_protobuf_payload_and_answers_json(receiver) -> None:
    req = make_request(4, extra_resources=1)
    status, headers, body = post(
        receiver.http_url, otlp_json(req), {"Content-Type": "application/json"}
    )
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == {}
    assert sorted(stored_payloads(receiver.store).values()) == sorted(resource_spans_bytes(req))
    assert [r[2] for r in block_rows(receiver.dsn)] == [4, 4]


def test_retries_are_idempotent(receiver) -> None:
    req = make_request(5, extra_resources=2).SerializeToString()
    for _ in range(3):
        assert post(receiver.http_url, req, PB)[0] == 200
    stub = trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(receiver.grpc_target))
    stub.Export(trace_service_pb2.ExportTraceServiceRequest.FromString(req), timeout=30)
    rows = block_rows(receiver.dsn)
    assert len(rows) == 3 and len(stored_payloads(receiver.store)) == 3
    with psycopg.connect(receiver.dsn) as c:
        assert c.execute("SELECT count(*) FROM otel_processes").fetchone()[0] == 3


def test_partial_success_for_bad_ids_and_zero_times(receiver) -> None:
    req = make_request(4)
    spans = req.resource_spans[0].scope_spans[0].spans
    spans[0].trace_id = b"\x01" * 15
    spans[1].start_time_unix_nano = 0
    status, _, body = post(receiver.http_url, req.SerializeToString(), PB)
    resp = trace_service_pb2.ExportTraceServiceResponse.FromString(body)
    assert status == 200 and resp.partial_success.rejected_spans == 2
    assert [r[2:4] for r in block_rows(receiver.dsn)] == [(4, 2)]  # kept, counted as rejected
    stub = trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(receiver.grpc_target))
    spans[2].span_id = b"\x02" * 9
    assert stub.Export(req, timeout=30).partial_success.rejected_spans == 3


def _bad_http_cases(limit: int) -> list[tuple[str, bytes, dict[str, str], int]]:
    good = make_request(2).SerializeToString()
    return [
        ("malformed protobuf", b"\x0a\xff\xff\xff\xff\x0f garbage", PB, 400),
        ("malformed json", b'{"resourceSpans": [', {"Content-Type": "application/json"}, 400),
        (
            "json bad hex id",
            b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"xyz"}]}]}]}',
            {"Content-Type": "application/json"},
            400,
        ),
        ("unsupported type", good, {"Content-Type": "text/plain"}, 415),
        ("unsupported encoding", good, {**PB, "Content-Encoding": "br"}, 415),
        ("bad gzip", b"\x1f\x8b not really", {**PB, "Content-Encoding": "gzip"}, 400),
        ("too large", b"\0" * (limit + 1), PB, 413),
        (
            "too large after gunzip",
            gzip.compress(b"\0" * (limit + 1)),
            {**PB, "Content-Encoding": "gzip"},
            413,
        ),
        (
            "gzip bomb",
            gzip.compress(b"\0" * (200 * 1024 * 1024), 9),
            {**PB, "Content-Encoding": "gzip"},
            413,
        ),
    ]


def test_bad_http_input_gets_status_and_stores_nothing(receiver_factory) -> None:
    limit = 64 * 1024
    r = receiver_factory("--max-body", str(limit))
    for name, body, headers, want in _bad_http_cases(limit):
        status, h, resp = post(r.http_url, body, headers)
        assert status == want, name
        assert resp, f"{name}: no message"
        if h.get("Content-Type", "").startswith("application/x-protobuf"):
            assert status_pb2.Status.FromString(resp).message, name
    assert stored_payloads(r.store) == {}
    assert block_rows(r.dsn) == []
    assert post(r.http_url, make_request(2).SerializeToString(), PB)[0] == 200  # still serving


def test_bearer_token_http_and_grpc(receiver_factory) -> None:
    r = receiver_factory("--token", "s3cret")
    body = make_request(2).SerializeToString()
    status, headers, _ = post(r.http_url, body, PB)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert post(r.http_url, body, {**PB, "Authorization": "Bearer wrong"})[0] == 401
    stub = trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(r.grpc_target))
    req = make_request(2, seed=1)
    with pytest.raises(grpc.RpcError) as e:
        stub.Export(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert block_rows(r.dsn) == [] and stored_payloads(r.store) == {}
    assert post(r.http_url, body, {**PB, "Authorization": "Bearer s3cret"})[0] == 200
    stub.Export(req, timeout=30, metadata=[("authorization", "Bearer s3cret")])
    exp = HttpExporter(endpoint=r.http_url, headers={"Authorization": "Bearer s3cret"})
    assert exp.export(record_spans("auth", 3)) == SpanExportResult.SUCCESS
    assert len(block_rows(r.dsn)) == 3


def test_grpc_bad_input_codes(receiver_factory) -> None:
    r = receiver_factory("--max-body", "65536")
    ch = grpc.insecure_channel(r.grpc_target)
    raw = ch.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
    with pytest.raises(grpc.RpcError) as e:
        raw(b"\x0a\xff\xff\xff\xff\x0f garbage", timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    big = make_request(2000)  # ~ 130 KiB
    stub = trace_service_pb2_grpc.TraceServiceStub(ch)
    with pytest.raises(grpc.RpcError) as e:
        stub.Export(big, timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert block_rows(r.dsn) == [] and stored_payloads(r.store) == {}


def test_database_down_gives_503_then_retry_succeeds(receiver, pg) -> None:
    body = make_request(3).SerializeToString()
    assert post(receiver.http_url, body, PB)[0] == 200
    dbname = psycopg.conninfo.conninfo_to_dict(receiver.dsn)["dbname"]
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (dbname,)
        )
        try:
            second = make_request(2, seed=5).SerializeToString()
            status, headers, _ = post(receiver.http_url, second, PB)
            assert status == 503 and int(headers["Retry-After"]) >= 1
            stub = trace_service_pb2_grpc.TraceServiceStub(
                grpc.insecure_channel(receiver.grpc_target)
            )
            with pytest.raises(grpc.RpcError) as e:
                stub.Export(make_request(2, seed=6), timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
    assert len(block_rows(receiver.dsn)) == 1  # nothing acknowledged, nothing recorded
    assert post(receiver.http_url, second, PB)[0] == 200  # the exporter's retry
    rows = block_rows(receiver.dsn)
    assert len(rows) == 2
    assert all((Path(receiver.store) / p).is_file() for *_, p in rows)


def test_overload_is_refused_with_retry_after(receiver_factory) -> None:
    r = receiver_factory("--max-inflight", "1")
    body = make_request(2, seed=3).SerializeToString()
    probe = make_request(1, seed=4).SerializeToString()
    # One request holds the only in-flight slot: its commit waits on a slow database.
    held, lock = hold_slot(r.dsn, r.http_port, r.base_url, body)
    try:
        status, headers, _ = post(r.http_url, probe, PB)
        assert status == 429 and headers["Retry-After"] == "1"
        stub = trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(r.grpc_target))
        with pytest.raises(grpc.RpcError) as e:
            stub.Export(make_request(1, seed=5), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        lock.rollback()  # the held request completes and is stored
        assert held.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        held.close()
        lock.close()
    assert len(block_rows(r.dsn)) == 1  # the refused ones were not stored
    assert post(r.http_url, probe, PB)[0] == 200
    assert len(block_rows(r.dsn)) == 2
