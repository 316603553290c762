"""Helpers for the ingestion tests: build OTLP requests and read back what was stored."""

from __future__ import annotations

import re
import socket
import time
import urllib.request
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


def inflight_requests(base_url: str) -> float:
    """The receiver's in-flight request gauge, from its ``/metrics``."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=30) as r:
        text = r.read().decode()
    return float(re.search(r"^otelspans_receiver_inflight_requests (\S+)$", text, re.M)[1])


def hold_slot(
    dsn: str, port: int, base_url: str, body: bytes, extra_headers: str = ""
) -> tuple[socket.socket, psycopg.Connection]:
    """Keep one request in flight: its metadata commit waits on a lock another session holds
    on ``otel_blocks`` (a slow database).  Release with ``lock.rollback()``; the request's
    answer can then be read from the socket."""
    lock = psycopg.connect(dsn)
    lock.execute("LOCK TABLE otel_blocks IN ACCESS EXCLUSIVE MODE")
    held = socket.create_connection(("127.0.0.1", port))
    held.sendall(
        b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
        + f"{extra_headers}Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    deadline = time.monotonic() + 20
    while inflight_requests(base_url) < 1:
        assert time.monotonic() < deadline, "the held request never got in flight"
        time.sleep(0.02)
    return held, lock


__all__ = [
    "T0",
    "ResourceSpans",
    "block_rows",
    "hold_slot",
    "inflight_requests",
    "kv",
    "make_request",
    "resource_spans_bytes",
    "stored_payloads",
]
