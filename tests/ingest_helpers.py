"""Helpers for the ingestion tests: build OTLP requests and read back what was stored."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span

T0 = 1_700_000_000_000_000_000


def kv(key: str, value: object) -> KeyValue:
    if isinstance(value, bool):
        v = AnyValue(bool_value=value)
    elif isinstance(value, int):
        v = AnyValue(int_value=value)
    elif isinstance(value, float):
        v = AnyValue(double_value=value)
    else:
        v = AnyValue(string_value=str(value))
    return KeyValue(key=key, value=v)


def make_request(
    n_spans: int = 3,
    *,
    service: str = "checkout",
    pid: int = 100,
    host: str = "host-a",
    seed: int = 0,
    extra_resources: int = 0,
) -> ExportTraceServiceRequest:
    """A request with one resource of ``n_spans`` valid spans (+ ``extra_resources`` more)."""
    req = ExportTraceServiceRequest()
    for r in range(1 + extra_resources):
        rs = req.resource_spans.add()
        rs.resource.attributes.extend(
            [kv("service.name", service), kv("process.pid", pid + r), kv("host.name", host)]
        )
        ss = rs.scope_spans.add()
        ss.scope.name = "tests"
        for i in range(n_spans):
            s = ss.spans.add()
            s.trace_id = uuid.UUID(int=seed * 1000 + r * 100 + 1).bytes
            s.span_id = (seed * 10_000 + r * 1000 + i + 1).to_bytes(8, "big")
            s.name = f"op-{i}"
            s.kind = Span.SPAN_KIND_SERVER
            s.start_time_unix_nano = T0 + seed * 10**9 + i * 1000
            s.end_time_unix_nano = T0 + seed * 10**9 + i * 1000 + 500
            s.attributes.append(kv("http.route", f"/r/{i}"))
    return req


def stored_payloads(store: Path) -> dict[str, bytes]:
    """Every object under ``store/blobs`` (temp files excluded), by relative path."""
    out = {}
    for p in (store / "blobs").rglob("*") if (store / "blobs").exists() else []:
        if p.is_file() and not p.name.startswith(".tmp-"):
            out[str(p.relative_to(store))] = p.read_bytes()
    return out


def block_rows(dsn: str) -> list[tuple]:
    """(block_id, process_id, nb_spans, nb_rejected, payload_size, object_path) of every block."""
    with psycopg.connect(dsn) as c:
        if not c.execute("SELECT to_regclass('otel_blocks')").fetchone()[0]:
            return []
        return c.execute(
            "SELECT block_id, process_id, nb_spans, nb_rejected, payload_size, object_path"
            " FROM otel_blocks ORDER BY block_id"
        ).fetchall()


def resource_spans_bytes(req: ExportTraceServiceRequest) -> list[bytes]:
    return [
        rs.SerializeToString()
        for rs in req.resource_spans
        if any(ss.spans for ss in rs.scope_spans)
    ]


__all__ = [
    "T0",
    "ResourceSpans",
    "block_rows",
    "kv",
    "make_request",
    "resource_spans_bytes",
    "stored_payloads",
]
