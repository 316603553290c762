"""A known trace across six services, sent as raw OTLP in several requests, and what to expect.

Trace ``T1`` crosses six processes (frontend, checkout, cart, payment, inventory, shipping);
two of its spans arrive late, in a third request after the rest; two of its spans are orphans
whose parents never arrive (one of them failed, one has a child).  ``T2`` and ``T3`` are noise in
the same processes and blocks; ``T4`` lives in a seventh process two days earlier (outside any
recent time window).  Everything expected is computed here from the specs and the sent
messages, never from the code under test.
"""

from __future__ import annotations

import datetime as dt
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans
from spans_helpers import expected_rows, kvs, row_key

T1 = "4bf92f3577b34da6a3ce929d0e0e4736"
T2 = "0af7651916cd43dd8448eb211c80319c"
T3 = "00000000000000000000000000000a03"
T4 = "00000000000000000000000000000a04"
MS = 1_000_000
#: Trace start: five minutes ago, on a whole millisecond (recent enough for window queries).
# Set when the module is imported (collection): tests that run much later in a long session
# must use windows of an hour or more to still see these spans as recent.
BASE_NS = (time.time_ns() - 300 * 10**9) // MS * MS
OLD_NS = BASE_NS - 2 * 86_400 * 10**9
SERVICES = ("frontend", "checkout", "cart", "payment", "inventory", "shipping", "batch")
KINDS = {"INTERNAL": 1, "SERVER": 2, "CLIENT": 3}


@dataclass(frozen=True)
class Spec:
    """One span: ids are small integers (span id = the integer as 8 big-endian bytes)."""

    service: str
    trace: str
    sid: int
    parent: int | None
    name: str
    kind: str
    start_ms: float
    dur_ms: float
    error: str | None = None
    base_ns: int = BASE_NS

    @property
    def span_id(self) -> str:
        return self.sid.to_bytes(8, "big").hex()

    @property
    def start_ns(self) -> int:
        return self.base_ns + round(self.start_ms * MS)

    @property
    def end_ns(self) -> int:
        return self.start_ns + round(self.dur_ms * MS)


S = Spec
#: Requests in the order they are sent; the third carries T1's late spans.
REQUESTS: list[list[Spec]] = [
    [
        S("frontend", T1, 1, None, "GET /checkout", "SERVER", 0, 100),
        S("frontend", T1, 3, 1, "POST /checkout", "CLIENT", 10, 80),
        S("frontend", T2, 101, None, "GET /", "SERVER", 20, 40),
        S("checkout", T1, 4, 3, "POST /checkout", "SERVER", 11, 78),
        S("checkout", T1, 5, 4, "GET /cart", "CLIENT", 12, 10),
        S("checkout", T1, 7, 4, "charge", "CLIENT", 25, 30),
        S("checkout", T1, 9, 4, "reserve", "CLIENT", 60, 10),
        S("checkout", T1, 11, 4, "ship", "CLIENT", 72, 16),
        S("checkout", T2, 102, 101, "GET /", "SERVER", 21, 38),
    ],
    [
        S("cart", T1, 6, 5, "GET /cart", "SERVER", 13, 8),
        S("cart", T3, 301, None, "cleanup", "INTERNAL", 200, 10),
        S("payment", T1, 8, 7, "charge", "SERVER", 26, 28, "card declined"),
        S("payment", T1, 14, 99, "fraud check", "INTERNAL", 30, 5, "timeout"),
        S("shipping", T1, 12, 11, "ship", "SERVER", 73, 14),
        S("shipping", T1, 13, 98, "quote carrier", "CLIENT", 74, 6),
        S("shipping", T1, 15, 13, "db query", "CLIENT", 75, 2),
        S("shipping", T1, 16, 12, "label", "INTERNAL", 81, 0),
    ],
    [
        S("frontend", T1, 2, 1, "render cart", "INTERNAL", 1, 5),
        S("inventory", T1, 10, 9, "reserve", "SERVER", 61, 8),
    ],
    [S("batch", T4, 401, None, "nightly", "INTERNAL", 0, 50, base_ns=OLD_NS)],
]
ALL_SPECS = [s for r in REQUESTS for s in r]


def resource_spans(service: str, specs: Iterable[Spec]) -> ResourceSpans:
    """One process's spans as OTLP (one scope)."""
    rs = ResourceSpans()
    rs.resource.attributes.extend(
        kvs(
            {
                "service.name": service,
                "process.pid": 1000 + SERVICES.index(service),
                "host.name": "host-t",
            }
        )
    )
    ss = rs.scope_spans.add()
    ss.scope.name = "trace-tests"
    for s in specs:
        sp = ss.spans.add()
        sp.trace_id = bytes.fromhex(s.trace)
        sp.span_id = bytes.fromhex(s.span_id)
        if s.parent is not None:
            sp.parent_span_id = s.parent.to_bytes(8, "big")
        sp.name = s.name
        sp.kind = KINDS[s.kind]  # type: ignore[assignment]
        sp.start_time_unix_nano = s.start_ns
        sp.end_time_unix_nano = s.end_ns
        if s.error:
            sp.status.code = 2  # type: ignore[assignment]
            sp.status.message = s.error
    return rs


def request_of(specs: list[Spec]) -> ExportTraceServiceRequest:
    """One request: a ResourceSpans per service, in order of first appearance."""
    req = ExportTraceServiceRequest()
    for service in dict.fromkeys(s.service for s in specs):
        req.resource_spans.append(
            resource_spans(service, [s for s in specs if s.service == service])
        )
    return req


def send_all(url: str) -> list[ResourceSpans]:
    """POST every request to a receiver (OTLP/HTTP protobuf); returns the sent resources."""
    sent: list[ResourceSpans] = []
    for specs in REQUESTS:
        req = request_of(specs)
        http = urllib.request.Request(
            url,
            data=req.SerializeToString(),
            headers={"Content-Type": "application/x-protobuf"},
            method="POST",
        )
        with urllib.request.urlopen(http, timeout=30) as r:
            assert r.status == 200
        sent.extend(req.resource_spans)
    return sent


def expected_from_sent(dsn: str, store: Path, sent: list[ResourceSpans]) -> list[dict[str, Any]]:
    """The rows every stored block must yield, decoded independently from the *sent* messages.

    Each block is matched to the sent resource it stores (protobuf equality of the payload);
    the metadata columns come from the block and process rows.
    """
    out: list[dict[str, Any]] = []
    with psycopg.connect(dsn) as c:
        blocks = c.execute(
            "SELECT b.block_id, b.process_id, b.stream_id, b.insert_time, b.object_path, p.exe,"
            " p.username, p.computer, p.properties, p.service_name"
            " FROM otel_blocks b JOIN otel_processes p USING (process_id)"
        ).fetchall()
    assert len(blocks) == len(sent)
    for bid, pid, sid, ins, path, exe, user, host, props, svc in blocks:
        stored = ResourceSpans.FromString((store / path).read_bytes())
        (rs,) = [m for m in sent if m == stored]
        out += expected_rows(
            rs,
            process_id=pid,
            stream_id=sid,
            block_id=bid,
            insert_time=ins,
            exe=exe,
            username=user,
            computer=host,
            process_properties=props,
            service_name=svc,
        )
    return sorted(out, key=row_key)


def ns_dt(ns: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=ns // 1000)


def percentile_cont(values: list[float], q: float) -> float:
    """PostgreSQL's percentile_cont: linear interpolation between the closest ranks."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def service_map(begin_ns: int, end_ns: int) -> list[tuple[Any, ...]]:
    """Expected ``otel_service_map`` rows from the specs (one process per service here)."""
    by_id = {(s.trace, s.sid): s for s in ALL_SPECS}
    calls: dict[tuple[str, str], list[Spec]] = {}
    for c in ALL_SPECS:
        p = by_id.get((c.trace, c.parent)) if c.parent is not None else None
        if p is None or p.service == c.service or not begin_ns <= c.start_ns <= end_ns:
            continue
        calls.setdefault((p.service, c.service), []).append(c)
    out = []
    for (a, b), cs in sorted(calls.items()):
        ms = [(c.end_ns - c.start_ns) / 1e6 for c in cs]
        out.append(
            (
                a,
                b,
                len(cs),
                sum(c.error is not None for c in cs),
                *(percentile_cont(ms, q) for q in (0.5, 0.95, 0.99)),
            )
        )
    return out
