"""Generated OTLP traces and an independent expected-rows decoder for the otel_spans tests.

:func:`make_resource_spans` builds ``ResourceSpans`` messages with every feature the row
mapping handles (all AnyValue kinds, scope extras, events, links, roots, zero-length spans,
malformed spans that must be skipped).  :func:`expected_rows` computes the rows straight from the
messages with plain Python, written separately from ``otelspans_fdw.lake.decode`` on purpose:
the tests compare the two.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import random
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span

from otelspans_fdw.ingest.decode import split_blocks
from otelspans_fdw.ingest.metadata import write_blocks
from otelspans_fdw.objstore import ObjectStore

T0_NS = 1_700_000_000_000_000_000  # 2023-11-14 22:13:20 UTC
KIND_NAMES = ["UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER"]
STATUS_NAMES = ["UNSET", "OK", "ERROR"]


def any_value(x: Any) -> AnyValue:
    """A Python value as an OTLP AnyValue (bytes -> bytes_value, dict -> kvlist)."""
    v = AnyValue()
    if x is None:
        return v
    if isinstance(x, bool):
        v.bool_value = x
    elif isinstance(x, int):
        v.int_value = x
    elif isinstance(x, float):
        v.double_value = x
    elif isinstance(x, bytes):
        v.bytes_value = x
    elif isinstance(x, list):
        v.array_value.values.extend(any_value(i) for i in x)
    elif isinstance(x, dict):
        v.kvlist_value.values.extend(KeyValue(key=k, value=any_value(i)) for k, i in x.items())
    else:
        v.string_value = str(x)
    return v


def kvs(d: dict[str, Any] | Sequence[tuple[str, Any]]) -> list[KeyValue]:
    items = d.items() if isinstance(d, dict) else d
    return [KeyValue(key=k, value=any_value(v)) for k, v in items]


def resource_attrs(service: str, pid: int, host: str = "host-a") -> dict[str, Any]:
    return {"service.name": service, "process.pid": pid, "host.name": host, "user.name": "alice"}


FANCY_ATTRS: list[tuple[str, Any]] = [
    ("s", "text"),
    ("i", -42),
    ("b", True),
    ("d", 2.5),
    ("nan", float("nan")),
    ("inf", float("inf")),
    ("ninf", float("-inf")),
    ("bytes", b"\x00\x01\xfe"),
    ("arr", [1, "two", [3.0, None]]),
    ("kv", {"a": 1, "b": {"c": [True]}}),
    ("nul", "a\x00b"),
    ("unicode", "h\u00e9 \u2603"),
    ("dup", 1),
    ("dup", 2),
    ("none", None),
]


def make_resource_spans(
    *,
    service: str = "checkout",
    pid: int = 1,
    host: str = "host-a",
    n: int = 50,
    base_ns: int = T0_NS,
    spacing_ns: int = 1_000_000_000,
    seed: int = 0,
    malformed: bool = True,
    fancy: bool = True,
) -> ResourceSpans:
    """One resource with ``n`` valid spans from ``base_ns`` every ``spacing_ns`` (+ malformed)."""
    rnd = random.Random(seed)
    rs = ResourceSpans()
    rs.resource.attributes.extend(kvs(resource_attrs(service, pid, host)))
    scopes = [rs.scope_spans.add(), rs.scope_spans.add()]
    scopes[0].scope.name = "lib.a"
    scopes[0].scope.version = "1.2"
    scopes[0].scope.attributes.extend(kvs({"lang": "py", "n": 3}))
    scopes[0].schema_url = "https://opentelemetry.io/schemas/1.21.0"
    # scopes[1] has no name/version/attributes: no otel.scope.* extras.
    for i in range(n):
        s = scopes[i % 2].spans.add()
        s.trace_id = rnd.randbytes(16)
        s.span_id = rnd.randbytes(8)
        if i % 3:
            s.parent_span_id = rnd.randbytes(8)
        elif i % 7 == 0:
            s.parent_span_id = b"\x01\x02\x03"  # bad length -> NULL
        s.name = f"op-{i % 5}" if i % 11 else "nul\x00name"
        s.kind = i % 7  # 6 is unknown -> UNSPECIFIED
        start = base_ns + i * spacing_ns + rnd.randrange(1000)
        s.start_time_unix_nano = start
        length = 0 if i % 10 == 0 else rnd.randrange(1, 5 * spacing_ns)
        s.end_time_unix_nano = start + length
        if i % 4 == 1:
            s.status.code = 2
            s.status.message = "boom" if i % 8 == 1 else ""
        elif i % 4 == 2:
            s.status.code = 1
        elif i % 4 == 3 and i % 13 == 0:
            s.status.code = 9  # unknown -> UNSET
        s.attributes.extend(kvs({"http.route": f"/r/{i % 3}", "i": i}))
        if i % 9 == 0:
            s.attributes.append(KeyValue(key="otel.scope.name", value=any_value("mine")))
        if fancy and i % 5 == 0:
            s.attributes.extend(kvs(FANCY_ATTRS))
            ev = s.events.add()
            ev.name = "exception"
            ev.time_unix_nano = start + 5
            ev.attributes.extend(kvs({"exception.message": "x", "nested": [1, {"k": b"z"}]}))
            s.events.add().name = "bare"
            lk = s.links.add()
            lk.trace_id = rnd.randbytes(16)
            lk.span_id = rnd.randbytes(8)
            lk.attributes.extend(kvs({"why": "follows"}))
    if malformed:
        bad = scopes[0].spans
        for tid, sid, st, en in [
            (b"\x01" * 15, b"\x02" * 8, base_ns, base_ns + 1),
            (b"\x01" * 16, b"", base_ns, base_ns + 1),
            (b"\x01" * 16, b"\x02" * 8, 0, base_ns + 1),
            (b"\x01" * 16, b"\x02" * 8, base_ns, 0),
        ]:
            s = bad.add()
            s.trace_id, s.span_id = tid, sid
            s.start_time_unix_nano, s.end_time_unix_nano = st, en
            s.name = "malformed"
            s.kind = Span.SPAN_KIND_CLIENT
    return rs


# --- independent expected rows ---------------------------------------------------------------


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "bytes_value":
        return base64.b64encode(v.bytes_value).decode()
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return _attrs(v.kvlist_value.values)
    if which == "double_value":
        x = v.double_value
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "Infinity" if x > 0 else "-Infinity"
        return x
    if which == "string_value":
        return v.string_value.replace("\x00", "\ufffd")
    return getattr(v, which)


def _attrs(kv_list: Iterable[KeyValue]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kv_list:
        out[kv.key.replace("\x00", "\ufffd")] = _value(kv.value)
    return out


def ns_to_dt(ns: int) -> dt.datetime:
    """Nanoseconds -> aware datetime truncated to microseconds (timestamptz)."""
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=ns // 1000)


def expected_rows(
    rs: ResourceSpans,
    *,
    process_id: uuid.UUID,
    stream_id: uuid.UUID,
    block_id: uuid.UUID,
    insert_time: dt.datetime,
    exe: str | None,
    username: str | None,
    computer: str | None,
    process_properties: dict[str, Any],
    service_name: str | None = None,
) -> list[dict[str, Any]]:
    """The rows of one block as psycopg returns them (uuid, datetime, str, int, parsed JSON)."""
    rows = []
    for ss in rs.scope_spans:
        scope: dict[str, Any] = {}
        if ss.scope.name:
            scope["otel.scope.name"] = ss.scope.name
        if ss.scope.version:
            scope["otel.scope.version"] = ss.scope.version
        for k, v in _attrs(ss.scope.attributes).items():
            scope["otel.scope.attr." + k] = v
        if ss.schema_url:
            scope["otel.scope.schema_url"] = ss.schema_url
        for s in ss.spans:
            # The OTLP rules, written out again: ids of the right length and not all zero,
            # non-zero times below 2^63 ns, end not before start.
            if len(s.trace_id) != 16 or len(s.span_id) != 8:
                continue
            if not any(s.trace_id) or not any(s.span_id):
                continue
            st, en = s.start_time_unix_nano, s.end_time_unix_nano
            if st == 0 or en == 0 or st >= 2**63 or en >= 2**63 or en < st:
                continue
            props = dict(scope)
            props.update(_attrs(s.attributes))
            code = s.status.code
            rows.append(
                {
                    "process_id": process_id,
                    "stream_id": stream_id,
                    "block_id": block_id,
                    "insert_time": insert_time,
                    "exe": exe,
                    "username": username,
                    "computer": computer,
                    "process_properties": process_properties,
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex()
                    if len(s.parent_span_id) == 8 and any(s.parent_span_id)
                    else None,
                    "start_time": ns_to_dt(s.start_time_unix_nano),
                    "end_time": ns_to_dt(s.end_time_unix_nano),
                    "duration": s.end_time_unix_nano - s.start_time_unix_nano,
                    "name": s.name.replace("\x00", "\ufffd"),
                    "kind": KIND_NAMES[s.kind] if s.kind < 6 else "UNSPECIFIED",
                    "status": STATUS_NAMES[code] if code < 3 else "UNSET",
                    "status_message": s.status.message.replace("\x00", "\ufffd") or None,
                    "properties": props,
                    "events": [
                        {
                            "name": e.name,
                            "time": e.time_unix_nano,
                            "attributes": _attrs(e.attributes),
                        }
                        for e in s.events
                    ],
                    "links": [
                        {
                            "trace_id": lk.trace_id.hex(),
                            "span_id": lk.span_id.hex(),
                            "attributes": _attrs(lk.attributes),
                        }
                        for lk in s.links
                    ],
                    "service_name": service_name,
                }
            )
    return rows


def arrow_rows(table: Any) -> list[dict[str, Any]]:
    """Rows of a span Arrow table in the same form as :func:`expected_rows`."""
    rows = table.to_pylist()
    for r in rows:
        for k in ("process_id", "stream_id", "block_id"):
            if k in r:
                r[k] = uuid.UUID(bytes=r[k])
        for k in ("process_properties", "properties", "events", "links"):
            if k in r:
                r[k] = json.loads(r[k])
    return rows


def row_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (str(r.get("block_id")), r["span_id"], r["start_time"])


# --- ingesting for the lake / SQL tests --------------------------------------------------------


class Ingested:
    """Blocks written through the ingestion code (store + metadata rows) and their expected rows."""

    def __init__(self, dsn: str, store: ObjectStore):
        self.dsn = dsn
        self.store = store
        self.messages: list[tuple[uuid.UUID, ResourceSpans]] = []  # (block_id, message)

    def add(self, rs: ResourceSpans, insert_time: dt.datetime | None = None) -> uuid.UUID:
        """Store ``rs`` as one block (payload, then metadata); optionally force insert_time."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        req = ExportTraceServiceRequest()
        req.resource_spans.append(rs)
        blocks = split_blocks(req).blocks
        assert len(blocks) == 1
        b = blocks[0]
        self.store.put_if_absent(b.object_path, b.payload)
        with psycopg.connect(self.dsn) as c:
            write_blocks(c, blocks)
            if insert_time is not None:
                c.execute(
                    "UPDATE otel_blocks SET insert_time = %s WHERE block_id = %s",
                    (insert_time, b.block_id),
                )
        parsed = ResourceSpans()
        parsed.ParseFromString(b.payload)
        self.messages.append((b.block_id, parsed))
        return b.block_id

    def expected(self, process_ids: Iterable[uuid.UUID] | None = None) -> list[dict[str, Any]]:
        """Expected rows of every ingested block (of ``process_ids`` if given), sorted."""
        want = set(process_ids) if process_ids is not None else None
        out: list[dict[str, Any]] = []
        with psycopg.connect(self.dsn) as c:
            for block_id, rs in self.messages:
                row = c.execute(
                    "SELECT b.process_id, b.stream_id, b.insert_time, p.exe, p.username,"
                    " p.computer, p.properties, p.service_name FROM otel_blocks b"
                    " JOIN otel_processes p USING (process_id) WHERE b.block_id = %s",
                    (block_id,),
                ).fetchone()
                assert row is not None
                if want is not None and row[0] not in want:
                    continue
                out += expected_rows(
                    rs,
                    process_id=row[0],
                    stream_id=row[1],
                    block_id=block_id,
                    insert_time=row[2],
                    exe=row[3],
                    username=row[4],
                    computer=row[5],
                    process_properties=row[6],
                    service_name=row[7],
                )
        return sorted(out, key=row_key)


def overlapping(rows: list[dict[str, Any]], begin: dt.datetime, end: dt.datetime) -> list[dict]:
    """Rows whose [start_time, end_time] overlaps [begin, end] (the scan's overlap filter)."""
    return [r for r in rows if r["start_time"] <= end and r["end_time"] >= begin]
