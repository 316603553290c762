"""The receiver's Prometheus endpoint after real traffic, and `otelspans status --receiver`."""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
import urllib.request

import aiohttp
import grpc
import psycopg
import pytest
from ingest_helpers import hold_slot, make_request, resource_spans_bytes
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export import SpanExportResult
from test_ingest_receiver import PB, post, record_spans

from otelspans_fdw.ingest.metrics import REQUEST_REASONS, SPAN_REASONS
from otelspans_fdw.ingest.scrape import parse_metrics
from otelspans_fdw.ingest.server import Receiver, ReceiverConfig

TOKEN = "m3trics"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 64 * 1024


def scrape_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def sizes(req: ExportTraceServiceRequest) -> tuple[int, int]:
    """(blocks, payload bytes) the receiver stores for an ExportTraceServiceRequest."""
    payloads = resource_spans_bytes(req)
    return len(payloads), sum(map(len, payloads))


class Expected:
    """Independent bookkeeping of what each request should have counted."""

    def __init__(self) -> None:
        self.m = parse_metrics(_EMPTY)  # all zeros, same shape
        for k in ("latency", "inflight_requests", "inflight_bytes"):
            del self.m[k]

    def ok(self, t: str, req: ExportTraceServiceRequest, rejected: int = 0) -> None:
        n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
        blocks, nbytes = sizes(req)
        self.m["requests_accepted"][t] += 1
        self.m["spans_accepted"][t] += n - rejected
        self.m["spans_rejected"][t]["invalid"] += rejected
        self.m["blocks_stored"][t] += blocks
        self.m["stored_bytes"][t] += nbytes

    def refused(self, t: str, reason: str, spans: int = 0) -> None:
        self.m["requests_rejected"][t][reason] += 1
        if spans:
            self.m["spans_rejected"][t][reason] += spans

    def requests(self, t: str) -> int:
        return self.m["requests_accepted"][t] + sum(self.m["requests_rejected"][t].values())


def _empty_exposition() -> str:
    from otelspans_fdw.ingest.metrics import ReceiverMetrics

    return ReceiverMetrics().exposition().decode()


_EMPTY = _empty_exposition()


def test_metrics_count_real_traffic_by_reason_and_status_reads_them(receiver_factory, pg) -> None:
    r = receiver_factory(
        "--token", TOKEN, "--max-body", str(LIMIT), "--max-inflight", "1", "--metrics-port", "0"
    )
    exp = Expected()
    # SDK exporters, both transports.
    sh, sg = record_spans("cart", 11), record_spans("payments", 12)
    assert HttpExporter(endpoint=r.http_url, headers=AUTH).export(sh) == SpanExportResult.SUCCESS
    exp.ok("http", encode_spans(sh))
    grpc_exp = GrpcExporter(
        endpoint=r.grpc_target, insecure=True, headers={"authorization": f"Bearer {TOKEN}"}
    )
    assert grpc_exp.export(sg) == SpanExportResult.SUCCESS
    exp.ok("grpc", encode_spans(sg))
    # partial_success: 2 of 4 spans invalid.
    req = make_request(4, seed=1)
    spans = req.resource_spans[0].scope_spans[0].spans
    spans[0].trace_id = b"\x01" * 15
    spans[1].start_time_unix_nano = 0
    assert post(r.http_url, req.SerializeToString(), {**PB, **AUTH})[0] == 200
    exp.ok("http", req, rejected=2)
    # Bad HTTP requests, one reason each.
    good = make_request(2, seed=2).SerializeToString()
    bad = [
        (b"\x0a\xff\xff\xff\xff\x0f garbage", PB, 400, "malformed"),
        (b'{"resourceSpans": [', {"Content-Type": "application/json"}, 400, "malformed"),
        (b"\x1f\x8b not gzip", {**PB, "Content-Encoding": "gzip"}, 400, "malformed"),
        (good, {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
        (good, {**PB, "Content-Encoding": "br"}, 415, "unsupported_media_type"),
        (b"\0" * (LIMIT + 1), PB, 413, "too_large"),
        (gzip.compress(b"\0" * (4 * LIMIT)), {**PB, "Content-Encoding": "gzip"}, 413, "too_large"),
    ]
    for body, headers, status, reason in bad:
        assert post(r.http_url, body, {**headers, **AUTH})[0] == status, reason
        exp.refused("http", reason)
    assert post(r.http_url, good, PB)[0] == 401
    exp.refused("http", "unauthorized")
    # Bad gRPC requests.
    ch = grpc.insecure_channel(r.grpc_target)
    raw = ch.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
    md = [("authorization", f"Bearer {TOKEN}")]
    with pytest.raises(grpc.RpcError) as e:
        raw(b"\x0a\xff\xff\xff\xff\x0f garbage", timeout=30, metadata=md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    exp.refused("grpc", "malformed")
    stub = trace_service_pb2_grpc.TraceServiceStub(ch)
    with pytest.raises(grpc.RpcError) as e:
        stub.Export(make_request(2, seed=3), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    exp.refused("grpc", "unauthorized")

    # Overload: a request waiting on a slow database holds the only slot; the in-flight
    # gauges show it meanwhile.
    slow_body = make_request(3, seed=4).SerializeToString()
    probe_req = make_request(1, seed=5)
    held, lock = hold_slot(
        r.dsn, r.http_port, r.base_url, slow_body, f"Authorization: Bearer {TOKEN}\r\n"
    )
    try:
        status = post(r.http_url, probe_req.SerializeToString(), {**PB, **AUTH})[0]
        assert status == 429
        exp.refused("http", "overloaded")
        during = parse_metrics(scrape_text(f"{r.base_url}/metrics"))
        assert (during["inflight_requests"], during["inflight_bytes"]) == (1, len(slow_body))
        with pytest.raises(grpc.RpcError) as e:
            stub.Export(make_request(1, seed=6), timeout=30, metadata=md)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        exp.refused("grpc", "overloaded")
        lock.rollback()
        assert held.recv(4096).startswith(b"HTTP/1.1 200")
        exp.ok("http", make_request(3, seed=4))
    finally:
        held.close()
        lock.close()

    # Database unavailable: decoded, not stored; its spans count as rejected for that reason.
    dbname = psycopg.conninfo.conninfo_to_dict(r.dsn)["dbname"]
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (dbname,)
        )
        try:
            body = make_request(2, seed=7).SerializeToString()
            assert post(r.http_url, body, {**PB, **AUTH})[0] == 503
            exp.refused("http", "database_unavailable", spans=2)
            with pytest.raises(grpc.RpcError) as e:
                stub.Export(make_request(3, seed=8), timeout=30, metadata=md)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            exp.refused("grpc", "database_unavailable", spans=3)
        finally:
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')

    got = parse_metrics(scrape_text(f"{r.base_url}/metrics"))
    other_port = parse_metrics(scrape_text(f"http://127.0.0.1:{r.metrics_port}/metrics"))
    latency = got.pop("latency")
    assert (got.pop("inflight_requests"), got.pop("inflight_bytes")) == (0, 0)
    assert got == exp.m
    for t in ("http", "grpc"):
        assert latency[t]["count"] == exp.requests(t)
        assert latency[t]["sum_seconds"] > 0
    assert exp.m["requests_rejected"]["http"]["too_large"] == 2  # the asserts above can fail
    other_port.pop("latency")
    assert {k: v for k, v in other_port.items() if not k.startswith("inflight")} == exp.m

    # `otelspans status` reads the same numbers next to the database counts.
    def status(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "otelspans_fdw.cli", "status", "--dsn", r.dsn,
             "--receiver", f"http://127.0.0.1:{r.http_port}", *extra],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    js = json.loads(status("--json").stdout)
    rec = js["receiver"]
    assert rec["url"] == f"http://127.0.0.1:{r.http_port}/metrics"
    assert {k: rec[k] for k in exp.m} == exp.m
    accepted = sum(exp.m["spans_accepted"].values())
    invalid = sum(v["invalid"] for v in exp.m["spans_rejected"].values())
    assert (js["spans"], js["rejected"]) == (accepted + invalid, invalid)  # no retries sent
    text = status().stdout
    lines = {ln[:40].strip(): ln[40:].split() for ln in text.splitlines() if len(ln) > 40}
    assert lines["requests accepted"] == [
        f"{exp.m['requests_accepted'][t]:,}" for t in ("http", "grpc")
    ]
    assert lines["requests rejected malformed"] == ["3", "1"]
    assert lines["spans rejected database_unavailable"] == ["2", "3"]
    assert lines["bytes stored"] == [f"{exp.m['stored_bytes'][t]:,}" for t in ("http", "grpc")]
    assert f"spans{accepted + invalid:>23,}" in text.splitlines()  # the database count, same output
    assert set(REQUEST_REASONS) >= {"overloaded"} and "invalid" in SPAN_REASONS


def test_receivers_in_one_process_have_separate_registries(fresh_dsn, tmp_path) -> None:
    async def run() -> tuple[dict, dict]:
        recs = [
            Receiver(ReceiverConfig(
                host="127.0.0.1", http_port=0, grpc_port=-1, dsn=fresh_dsn,
                store_url=str(tmp_path / f"s{i}"), durable=False, token=None,
            ))
            for i in range(2)
        ]  # fmt: skip
        for rec in recs:
            await rec.start()
        try:
            async with aiohttp.ClientSession() as s:
                for n, rec in enumerate(recs):
                    for i in range(n + 1):  # receiver 0 gets 1 request, receiver 1 gets 2
                        body = make_request(2 + n, seed=10 * n + i).SerializeToString()
                        async with s.post(
                            f"http://127.0.0.1:{rec.http_port}/v1/traces", data=body, headers=PB
                        ) as resp:
                            assert resp.status == 200
                out = []
                for rec in recs:
                    async with s.get(f"http://127.0.0.1:{rec.http_port}/metrics") as resp:
                        out.append(parse_metrics(await resp.text()))
        finally:
            for rec in recs:
                await rec.stop()
        return out[0], out[1]

    a, b = asyncio.run(run())
    assert (a["requests_accepted"]["http"], a["spans_accepted"]["http"]) == (1, 2)
    assert (b["requests_accepted"]["http"], b["spans_accepted"]["http"]) == (2, 6)
