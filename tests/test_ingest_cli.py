"""The `otelspans` command: migrate, ingest FILE, status, generate (raw and SDK)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import psycopg
from ingest_helpers import block_rows, make_request
from test_ingest_decode import otlp_json

from otelspans_fdw.ingest.decode import decode_request
from otelspans_fdw.loadgen import traffic


def otelspans(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "otelspans_fdw.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_migrate_ingest_status(fresh_dsn, tmp_path) -> None:
    first = otelspans("migrate", "--dsn", fresh_dsn).stdout
    # metadata 1-4 and lake 1-2, by CREATE EXTENSION (0.1, then its update to 0.2)
    assert "applied 6 migration" in first and "extension otelspans in schema public" in first
    assert "applied 0 migration" in otelspans("migrate", "--dsn", fresh_dsn).stdout
    (tmp_path / "a.pb").write_bytes(make_request(3, seed=1).SerializeToString())
    (tmp_path / "b.json").write_bytes(otlp_json(make_request(4, seed=2)))
    (tmp_path / "c.pb.gz").write_bytes(gzip.compress(make_request(5, seed=3).SerializeToString()))
    (tmp_path / "bad.pb").write_bytes(b"\xff\xff garbage")
    store = tmp_path / "store"
    files = [str(tmp_path / n) for n in ("a.pb", "b.json", "c.pb.gz")]
    r = otelspans("ingest", "--dsn", fresh_dsn, "--store", str(store), *files)
    assert r.returncode == 0, r.stderr
    r = otelspans(
        "ingest", "--dsn", fresh_dsn, "--store", str(store), *files, str(tmp_path / "bad.pb")
    )
    assert r.returncode == 1 and "bad.pb" in r.stderr
    status = json.loads(otelspans("status", "--dsn", fresh_dsn, "--json").stdout)
    assert status["blocks"] == 3 and status["spans"] == 12 and status["processes"] == 1
    assert sorted(r[2] for r in block_rows(fresh_dsn)) == [3, 4, 5]


def test_generate_raw_is_deterministic_and_idempotent(receiver) -> None:
    args = [
        "generate",
        "--mode",
        "raw",
        "--spans",
        "3000",
        "--seed",
        "5",
        "--batch",
        "500",
        "--base-time-ns",
        str(1_750_000_000 * 10**9),
        "--endpoint",
        f"127.0.0.1:{receiver.http_port}",
    ]
    first = otelspans(*args)
    assert first.returncode == 0, first.stderr
    assert "spans/s" in first.stderr  # the progress display...
    # ...off a terminal: whole lines, no carriage return, a final newline
    assert "\r" not in first.stderr and first.stderr.endswith("\n")
    assert all(ln.startswith("sent ") for ln in first.stderr.splitlines() if "spans/s" in ln)
    rows = block_rows(receiver.dsn)
    assert sum(r[2] for r in rows) == json.loads(first.stdout)["spans"] >= 3000
    assert otelspans(*args).returncode == 0
    assert block_rows(receiver.dsn) == rows  # same seed: same requests, nothing new


def test_generate_sdk_grpc_makes_realistic_traces(receiver) -> None:
    r = otelspans(
        "generate",
        "--mode",
        "sdk",
        "--protocol",
        "grpc",
        "--spans",
        "600",
        "--seed",
        "3",
        "--endpoint",
        receiver.grpc_target,
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    with psycopg.connect(receiver.dsn) as c:
        exes = {x for (x,) in c.execute("SELECT exe FROM otel_processes")}
    assert exes == {f"shop/{s}" for s in traffic.SERVICES}
    spans = {}
    proc_of = {}
    for p in (receiver.store / "blobs").rglob("*"):
        if p.is_file():
            from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans

            rs = ResourceSpans.FromString(p.read_bytes())
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans[s.span_id] = s
                    proc_of[s.span_id] = p.parent.parent.name
    assert len(spans) >= 600
    cross = [
        s
        for s in spans.values()
        if s.parent_span_id in spans and proc_of[s.parent_span_id] != proc_of[s.span_id]
    ]
    assert cross and all(s.kind == s.SPAN_KIND_SERVER for s in cross)
    assert any(s.status.code == s.status.STATUS_CODE_ERROR for s in spans.values())
    assert any(s.events for s in spans.values()) and any(s.links for s in spans.values())
    assert all(len(s.attributes) for s in spans.values() if s.kind == s.SPAN_KIND_SERVER)


def test_encode_requests_deterministic() -> None:
    def enc() -> list[bytes]:
        return traffic.encode_requests(traffic.TraceModel(7, 6, 10**18), 2500, 1000)

    a = enc()
    assert a == enc()
    assert all(len(decode_request(b).blocks) == 1 for b in a)
