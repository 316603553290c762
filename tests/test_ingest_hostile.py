"""Hostile and unusual input against a running receiver and the real extension.

Every case goes over OTLP/HTTP protobuf, OTLP/HTTP JSON and gRPC; each asserts the status, the
partial-success count, the rows stored, the files in the store, and that the next ``SELECT``
on that process works.  The poison test sends requests whose rows the database refuses at the
same moment as good ones: every good one must be acknowledged and stored.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from ingest_helpers import T0, kv
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue, KeyValueList
from test_ingest_decode import otlp_json
from test_ingest_receiver import PB, post

from otelspans_fdw import otlp
from otelspans_fdw.devcluster import LocalCluster

JSON = {"Content-Type": "application/json"}
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def _request(service: str, spans: list[dict[str, Any]], resource: list[KeyValue] = ()) -> Any:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.extend([kv("service.name", service), kv("process.pid", 7), *resource])
    ss = rs.scope_spans.add()
    ss.scope.name = "hostile"
    for i, over in enumerate(spans):
        s = ss.spans.add()
        s.trace_id = uuid.UUID(int=0xABC0 + i).bytes
        s.span_id = (0x100 + i).to_bytes(8, "big")
        s.name = f"op-{i}"
        s.start_time_unix_nano = T0 + i * 1000
        s.end_time_unix_nano = T0 + i * 1000 + 500
        s.attributes.append(kv("i", i))
        for k, v in over.items():
            if k == "attributes":
                s.attributes.extend(v)
            else:
                setattr(s, k, v)
    return req


def _nested(depth: int) -> AnyValue:
    v = AnyValue(string_value="leaf\0")
    for i in range(depth):
        v = AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key=f"d{i}", value=v)]))
    return v


GOOD: dict[str, Any] = {}
# name -> (spans, resource attributes, spans rejected); every other span is stored.
CASES: dict[str, tuple[list[dict[str, Any]], list[KeyValue], int]] = {
    "time 2^63 and beyond": (
        [GOOD, {"end_time_unix_nano": 2**63}, {"start_time_unix_nano": 2**64 - 1}],
        [],
        2,
    ),
    "end before start": ([GOOD, {"end_time_unix_nano": T0 - 1}], [], 1),
    "all-zero ids": (
        [GOOD, {"trace_id": b"\0" * 16}, {"span_id": b"\0" * 8}, {"parent_span_id": b"\0" * 8}],
        [],
        2,
    ),
    "NUL in resource attributes": (
        [GOOD, GOOD],
        [
            kv("process.command_line", "python\0app.py"),
            kv("host.name", "h\0st"),
            kv("k\0ey", "v\0"),
        ],
        0,
    ),
    "NaN and infinities in resource": (
        [GOOD],
        [kv("x.nan", math.nan), kv("x.inf", math.inf), kv("x.ninf", -math.inf)],
        0,
    ),
    "NUL keys repeated and clashing with scope keys": (
        [{"attributes": [kv("k\0", 1), kv("k\0", 2), kv("otel.scope.name\0", "x")]}, GOOD],
        [],
        0,
    ),
    "NUL in names and deep values": (
        [{"name": "n\0me", "attributes": [KeyValue(key="deep", value=_nested(10))]}],
        [kv("process.creation.time", "3000-01-01T00:00:00Z")],
        0,
    ),
    "every span rejected": ([{"trace_id": b"\1"}, {"start_time_unix_nano": 0}], [], 2),
}


@pytest.fixture
def hostile(fresh_dsn: str, pg: LocalCluster, receiver_factory: Any) -> Iterator[Any]:
    store = pg.base / f"store-{uuid.uuid4().hex[:8]}"
    store.mkdir()
    os.chmod(store, 0o777)  # the receiver (this user) and the backend (postgres) share it
    rcv = receiver_factory(store=store)
    conn = psycopg.connect(fresh_dsn, autocommit=True)
    conn.execute("CREATE EXTENSION IF NOT EXISTS otelspans")
    conn.execute(f"ALTER SERVER otel_spans_server OPTIONS (ADD store '{store}')")
    yield rcv, conn, store
    conn.close()
    shutil.rmtree(store, ignore_errors=True)


def _send(rcv: Any, transport: str, req: Any) -> tuple[int, int]:
    """(HTTP status or gRPC code value, rejected spans of the partial success)."""
    if transport == "grpc":
        with grpc.insecure_channel(rcv.grpc_target) as ch:
            call = ch.unary_unary(
                EXPORT,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString,
            )
            try:
                resp = call(req, timeout=30)
            except grpc.RpcError as e:
                return e.code().value[0], 0
            return 0, resp.partial_success.rejected_spans
    if transport == "json":
        status, _, body = post(rcv.http_url, otlp_json(req), JSON)
        if status != 200:
            return status, 0
        import json

        return status, int(json.loads(body).get("partialSuccess", {}).get("rejectedSpans", 0))
    status, _, body = post(rcv.http_url, req.SerializeToString(), PB)
    if status != 200:
        return status, 0
    return status, trace_service_pb2.ExportTraceServiceResponse.FromString(
        body
    ).partial_success.rejected_spans


def _pid(req: Any) -> uuid.UUID:
    attrs = otlp.attributes_to_dict(req.resource_spans[0].resource.attributes)
    return otlp.process_info(attrs).process_id


def _blobs(store: Path, pid: uuid.UUID) -> int:
    d = store / "blobs" / str(pid)
    return sum(1 for p in d.rglob("*") if p.is_file()) if d.exists() else 0


@pytest.mark.parametrize("transport", ["protobuf", "json", "grpc"])
def test_hostile_inputs(hostile: Any, transport: str) -> None:
    rcv, conn, store = hostile
    for name, (spans, resource, rejected) in CASES.items():
        req = _request(f"{name}/{transport}", spans, resource)
        ok = 0 if transport == "grpc" else 200
        assert _send(rcv, transport, req) == (ok, rejected), name
        pid = _pid(req)
        stored = len(spans) - rejected
        assert _blobs(store, pid) == (1 if stored else 0), name
        rows = conn.execute(
            "SELECT span_id, name, properties, service_name FROM otel_spans WHERE process_id = %s",
            (pid,),
        ).fetchall()
        assert len(rows) == stored, name
        assert all("\0" not in r[1] for r in rows), name
        if stored:
            got = conn.execute(
                "SELECT service_name, properties FROM otel_processes WHERE process_id = %s",
                (pid,),
            ).fetchone()
            assert got[0] == f"{name}/{transport}", name
            assert "\0" not in str(got[1]), name
    # Properties of the trickiest cases, through SQL.
    pid = _pid(_request(f"NUL keys repeated and clashing with scope keys/{transport}", []))
    props = conn.execute(
        "SELECT properties FROM otel_spans WHERE process_id = %s AND name = 'op-0'", (pid,)
    ).fetchone()[0]
    assert props == {
        "otel.scope.name": "hostile",
        "i": 0,
        "k\ufffd": 2,
        "otel.scope.name\ufffd": "x",
    }
    pid = _pid(_request(f"NaN and infinities in resource/{transport}", []))
    props = conn.execute(
        "SELECT properties FROM otel_processes WHERE process_id = %s", (pid,)
    ).fetchone()[0]
    assert props["otel.resource.x.nan"] == "NaN" and props["otel.resource.x.ninf"] == "-Infinity"
    # Nothing in otel_block_errors: everything accepted decodes.
    assert conn.execute("SELECT count(*) FROM otel_block_errors").fetchone()[0] == 0


def test_invalid_utf8_is_refused_and_stores_nothing(hostile: Any) -> None:
    rcv, _conn, store = hostile
    req = _request("utf8", [GOOD])
    body = req.SerializeToString().replace(b"op-0", b"op\xff0")
    assert post(rcv.http_url, body, PB)[0] == 400
    with grpc.insecure_channel(rcv.grpc_target) as ch:
        call = ch.unary_unary(EXPORT, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as e:
            call(body, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    lone = otlp_json(req).replace(b'"op-0"', b'"op\\ud800"')
    assert post(rcv.http_url, lone, JSON)[0] == 400
    assert not (store / "blobs").exists() or not any((store / "blobs").rglob("*"))


def _poison_trigger(conn: psycopg.Connection) -> None:
    """Rows the database refuses although the receiver cannot know: a CHECK a DBA added."""
    conn.execute(
        "ALTER TABLE otel_processes ADD CONSTRAINT no_poison"
        " CHECK (service_name IS DISTINCT FROM 'poison')"
    )


def test_poison_requests_fail_alone(hostile: Any) -> None:
    rcv, conn, store = hostile
    _poison_trigger(conn)
    jobs: list[tuple[str, str, Any]] = []
    for i in range(48):
        jobs.append(("good", ("protobuf", "json", "grpc")[i % 3], _request(f"good-{i}", [GOOD])))
    for i in range(12):
        poison = _request("poison", [GOOD], [kv("service.instance.id", f"p{i}")])
        jobs.append(("poison", ("protobuf", "grpc")[i % 2], poison))
    for i in range(6):  # sanitised before the commit: they must not disturb anybody either
        spans, resource, _ = CASES[("time 2^63 and beyond", "NUL in resource attributes")[i % 2]]
        jobs.append(("good", "protobuf", _request(f"hostile-{i}", spans, resource)))
    order = list(range(len(jobs)))
    order = order[::2] + order[1::2]  # interleave kinds
    send: Callable[[int], tuple[int, int]] = lambda j: _send(rcv, jobs[j][1], jobs[j][2])  # noqa: E731
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        results = dict(zip(order, pool.map(send, order), strict=True))
    for j, (kind, transport, req) in enumerate(jobs):
        status = results[j][0]
        pid = _pid(req)
        if kind == "good":
            assert status == (0 if transport == "grpc" else 200), (j, transport)
            n = conn.execute("SELECT count(*) FROM otel_spans WHERE process_id = %s", (pid,))
            assert n.fetchone()[0] >= 1
        else:
            want = grpc.StatusCode.INVALID_ARGUMENT.value[0] if transport == "grpc" else 400
            assert status == want, (j, transport)
            assert _blobs(store, pid) == 0
    assert (
        conn.execute(
            "SELECT count(*) FROM otel_processes WHERE service_name = 'poison'"
        ).fetchone()[0]
        == 0
    )


def test_otel_trace_returns_cycles_and_self_parents_marked(hostile: Any) -> None:
    rcv, conn, _ = hostile
    tid = uuid.UUID(int=0xC1C1E).bytes

    def sid(n: int) -> bytes:
        return (0x100 + n).to_bytes(8, "big")

    # 0 root, 1 its child; 2 <-> 3 a parent cycle, 4 a child of 2; 5 its own parent.
    parents = {1: 0, 2: 3, 3: 2, 4: 2, 5: 5}
    spans = [
        {"trace_id": tid, **({"parent_span_id": sid(parents[i])} if i in parents else {})}
        for i in range(6)
    ]
    assert _send(rcv, "protobuf", _request("cycles", spans)) == (200, 0)
    rows = conn.execute(
        "SELECT span_id, depth, orphan, cycle FROM otel_trace(%s)", (tid.hex(),)
    ).fetchall()
    assert (
        len(rows)
        == 6
        == len(
            conn.execute("SELECT 1 FROM otel_spans WHERE trace_id = %s", (tid.hex(),)).fetchall()
        )
    )
    got = {r[0]: r[1:] for r in rows}
    assert got == {
        sid(0).hex(): (0, False, False),
        sid(1).hex(): (1, False, False),
        sid(2).hex(): (0, False, True),  # the cycle's entry: its lowest span id
        sid(3).hex(): (1, False, True),
        sid(4).hex(): (1, False, False),
        sid(5).hex(): (0, False, True),
    }
    assert [r[0] for r in rows][:2] == [sid(0).hex(), sid(1).hex()]  # tree order by start
