"""One block (serialized OTLP ``ResourceSpans``) -> an Arrow table of span rows.  No I/O.

The row mapping is upstream's (see ``reference/upstream-otel-spans.md``):

* spans with a trace id that is not 16 bytes, a span id that is not 8 bytes, or a zero start
  or end time are skipped (the receiver counted them as rejected already);
* ``parent_span_id`` is NULL unless it is exactly 8 bytes; ``status_message`` NULL when empty;
* ``kind``/``status`` are names (unknown numbers -> ``UNSPECIFIED``/``UNSET``);
* ``properties`` = the span's attributes plus ``otel.scope.name``, ``otel.scope.version``,
  ``otel.scope.attr.<k>`` and ``otel.scope.schema_url`` when non-empty (on a key collision the
  span's own attribute wins: it is the more specific);
* ``events`` = ``[{name, time (ns), attributes}]``, ``links`` = ``[{trace_id, span_id,
  attributes}]`` with hex ids;
* ``AnyValue`` -> JSON: string, bool, int, double as themselves (non-finite doubles as the
  strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``, as in protobuf's JSON mapping, because
  JSON has no such numbers), bytes as base64, arrays and kvlists recursively, absent -> null.

PostgreSQL text and jsonb cannot hold U+0000, which OTLP strings may contain: it is replaced by
U+FFFD in names, messages and JSON.

Speed: this is the cold path of every query (target >= 200k spans/s).  One Python loop walks
the protobuf spans and appends scalars to plain lists; everything else is done by Arrow in C:
hex ids are produced by one ``bytes.hex()`` over all ids and wrapped as fixed-width strings
without copying, kind/status names by ``take``, timestamps by integer division, and the
per-block constant columns by ``pa.repeat``.  JSON text is produced only for attribute maps,
events and links, with one shared encoder.
"""

from __future__ import annotations

import base64
import json
import math
import re
import uuid
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf.message import DecodeError as ProtobufDecodeError
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from otelspans_fdw.exceptions import DecodeError
from otelspans_fdw.lake._lazy_pb import LazyResourceSpans
from otelspans_fdw.schema import COLUMN_NAMES, TIMESTAMP, arrow_schema

__all__ = [
    "KINDS",
    "STATUSES",
    "BlockInfo",
    "anyvalue_to_json",
    "attributes_to_dict",
    "decode_block",
    "empty_table",
    "hex_array",
]

KINDS: tuple[str, ...] = ("UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER")
STATUSES: tuple[str, ...] = ("UNSET", "OK", "ERROR")

_KIND_DICT = pa.array(KINDS, pa.utf8())
_STATUS_DICT = pa.array(STATUSES, pa.utf8())
_ENCODER = json.JSONEncoder(ensure_ascii=False, check_circular=False, separators=(",", ":"))
_encode: Callable[[Any], str] = _ENCODER.encode
_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """What a block's rows take from the metadata rather than from the payload."""

    process_id: uuid.UUID
    stream_id: uuid.UUID
    block_id: uuid.UUID
    insert_time: datetime
    exe: str | None = None
    username: str | None = None
    computer: str | None = None
    process_properties: str = "{}"  # JSON text, keys sorted


def _double(x: float) -> float | str:
    if math.isfinite(x):
        return x
    return "NaN" if x != x else ("Infinity" if x > 0 else "-Infinity")


def anyvalue_to_json(v: Any) -> Any:
    """An OTLP ``AnyValue`` as a JSON-able Python value (see the module docstring)."""
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return v.string_value
    if kind == "int_value":
        return v.int_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "double_value":
        return _double(v.double_value)
    if kind is None:
        return None
    if kind == "array_value":
        return [anyvalue_to_json(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes_to_dict(v.kvlist_value.values)
    if kind == "bytes_value":
        return base64.b64encode(v.bytes_value).decode("ascii")
    return None  # a value kind newer than this code


def attributes_to_dict(kvs: Sequence[Any]) -> dict[str, Any]:
    """A repeated ``KeyValue`` as a dict (last duplicate wins, like jsonb)."""
    out: dict[str, Any] = {}
    for kv in kvs:
        v = kv.value
        kind = v.WhichOneof("value")
        if kind == "string_value":
            out[kv.key] = v.string_value
        elif kind == "int_value":
            out[kv.key] = v.int_value
        else:
            out[kv.key] = anyvalue_to_json(v)
    return out


def _strip_nul(obj: Any) -> Any:
    if isinstance(obj, str):
        return obj.replace("\x00", "\ufffd")
    if isinstance(obj, list):
        return [_strip_nul(x) for x in obj]
    if isinstance(obj, dict):
        return {_strip_nul(k): _strip_nul(v) for k, v in obj.items()}
    return obj


def _json(obj: Any) -> str:
    """Compact JSON text that jsonb accepts (no ``\\u0000``)."""
    text = _encode(obj)
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        text = _encode(_strip_nul(obj))
    return text


def hex_array(ids: bytes, width: int, n: int, valid: list[bool] | None = None) -> pa.Array:
    """``n`` ids of ``width`` bytes, concatenated in ``ids``, as lowercase hex strings.

    One ``bytes.hex()`` call and zero-copy buffers: no Python work per id.  ``valid`` marks
    nulls (their bytes are ignored).
    """
    data = pa.py_buffer(ids.hex().encode("ascii"))
    step = 2 * width
    offsets = pa.py_buffer(array("i", range(0, step * n + 1, step)).tobytes())
    bitmap = None
    if valid is not None and not all(valid):
        bitmap = pa.array(valid, pa.bool_()).buffers()[1]
    return pa.Array.from_buffers(pa.utf8(), n, [bitmap, offsets, data])


def _ns_to_timestamp(ns: pa.Array) -> pa.Array:
    """Epoch nanoseconds (int64) -> ``timestamp('us', UTC)``, truncated (positive times)."""
    return pc.divide(ns, pa.scalar(1000, pa.int64())).cast(TIMESTAMP)


def empty_table() -> pa.Table:
    """A table with the span schema and no rows."""
    return arrow_schema().empty_table()


def _scope_extras(ss: Any) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    scope = InstrumentationScope.FromString(ss.scope) if ss.scope else InstrumentationScope()
    if scope.name:
        extras["otel.scope.name"] = scope.name
    if scope.version:
        extras["otel.scope.version"] = scope.version
    for k, v in attributes_to_dict(scope.attributes).items():
        extras[f"otel.scope.attr.{k}"] = v
    if ss.schema_url:
        extras["otel.scope.schema_url"] = ss.schema_url
    return extras


def _events(events: Sequence[bytes]) -> str:
    out = []
    for raw in events:
        e = Span.Event.FromString(raw)
        out.append(
            {
                "name": e.name,
                "time": e.time_unix_nano,
                "attributes": attributes_to_dict(e.attributes),
            }
        )
    return _json(out)


def _links(links: Sequence[bytes]) -> str:
    out = []
    for raw in links:
        lk = Span.Link.FromString(raw)
        out.append(
            {
                "trace_id": lk.trace_id.hex(),
                "span_id": lk.span_id.hex(),
                "attributes": attributes_to_dict(lk.attributes),
            }
        )
    return _json(out)


class _AttrCache:
    """Serialized ``KeyValue`` -> (key, JSON fragment ``"key":value``), shared across blocks.

    Bounded: cleared when it grows past :attr:`limit` entries (high-cardinality values such as
    ids would otherwise grow it forever); clearing only costs re-parsing.
    """

    limit = 200_000

    def __init__(self) -> None:
        self.map: dict[bytes, tuple[str, str]] = {}

    def miss(self, raw: bytes) -> tuple[str, str]:
        kv = KeyValue.FromString(raw)
        key = kv.key
        item = (key, _json({key: anyvalue_to_json(kv.value)})[1:-1])
        if len(self.map) >= self.limit:
            self.map.clear()
        self.map[raw] = item
        return item


_ATTRS = _AttrCache()
_STATUS_CACHE: dict[bytes, tuple[int, str | None]] = {}


def _status(raw: bytes) -> tuple[int, str | None]:
    got = _STATUS_CACHE.get(raw)
    if got is None:
        st = Status.FromString(raw)
        code = st.code if 0 <= st.code < len(STATUSES) else 0
        got = (code, st.message or None)
        if len(_STATUS_CACHE) > 10_000:
            _STATUS_CACHE.clear()
        _STATUS_CACHE[raw] = got
    return got


def _properties(items: list[tuple[str, str]], extras: dict[str, Any], prefix: str) -> str:
    """JSON object text: scope ``prefix`` then attribute fragments; dict semantics on repeats.

    A repeated key (within the attributes, or an attribute named like a scope extra) takes the
    slow path, so the text never holds duplicate keys (jsonb would keep the last one, but
    other readers of the Parquet files may not).
    """
    if len(items) > 1 or extras:
        keys = {k for k, _ in items}
        if len(keys) != len(items) or (extras and not keys.isdisjoint(extras)):
            d = dict(extras)
            for k, frag in items:
                d[k] = json.loads("{" + frag + "}")[k]
            return _json(d)
    return "{" + prefix + ",".join([f for _, f in items]) + "}"


def decode_block(payload: bytes, info: BlockInfo) -> pa.Table:
    """The span rows of one block, in the column order of :func:`arrow_schema`.

    Raises:
        DecodeError: the payload is not a valid ``ResourceSpans`` message.
    """
    try:
        rs = LazyResourceSpans.FromString(payload)
        return _decode(rs, info)
    except ProtobufDecodeError as e:
        raise DecodeError(f"block {info.block_id}: malformed ResourceSpans: {e}") from e


def _decode(rs: Any, info: BlockInfo) -> pa.Table:
    trace_ids: list[bytes] = []
    span_ids: list[bytes] = []
    parents: list[bytes] = []
    has_parent: list[bool] = []
    starts: list[int] = []
    ends: list[int] = []
    names: list[str] = []
    kinds: list[int] = []
    statuses: list[int] = []
    messages: list[str | None] = []
    props: list[str] = []
    events: list[str] = []
    links: list[str] = []
    no_parent = b"\0" * 8
    nkinds = len(KINDS)
    cache_get = _ATTRS.map.get
    cache_miss = _ATTRS.miss

    for ss in rs.scope_spans:
        extras = _scope_extras(ss)
        prefix = _json(extras)[1:-1]
        empty_props = "{" + prefix + "}"
        prefix = prefix + "," if prefix else ""
        for s in ss.spans:
            tid = s.trace_id
            sid = s.span_id
            st = s.start_time_unix_nano
            en = s.end_time_unix_nano
            if len(tid) != 16 or len(sid) != 8 or not st or not en:
                continue
            trace_ids.append(tid)
            span_ids.append(sid)
            p = s.parent_span_id
            if len(p) == 8:
                parents.append(p)
                has_parent.append(True)
            else:
                parents.append(no_parent)
                has_parent.append(False)
            starts.append(st)
            ends.append(en)
            names.append(s.name)
            k = s.kind
            kinds.append(k if 0 <= k < nkinds else 0)
            status = s.status
            if status:
                c, m = _status(status)
                statuses.append(c)
                messages.append(m)
            else:
                statuses.append(0)
                messages.append(None)
            attrs = s.attributes
            if attrs:
                items = [cache_get(b) or cache_miss(b) for b in attrs]
                if len(items) == 1 and not extras:
                    props.append("{" + items[0][1] + "}")
                else:
                    props.append(_properties(items, extras, prefix))
            else:
                props.append(empty_props)
            ev = s.events
            events.append(_events(ev) if ev else "[]")
            lk = s.links
            links.append(_links(lk) if lk else "[]")

    n = len(starts)
    if n == 0:
        return empty_table()
    start_arr = pa.array(starts, pa.int64())
    end_arr = pa.array(ends, pa.int64())
    name_arr = pa.array(names, pa.utf8())
    msg_arr = pa.array(messages, pa.utf8())
    if pc.any(pc.match_substring(name_arr, "\x00")).as_py():
        name_arr = pc.replace_substring(name_arr, "\x00", "\ufffd")
    if msg_arr.null_count < n and pc.any(pc.match_substring(msg_arr, "\x00")).as_py():
        msg_arr = pc.replace_substring(msg_arr, "\x00", "\ufffd")
    cols: dict[str, pa.Array] = {
        "process_id": pa.repeat(pa.scalar(info.process_id.bytes, pa.binary(16)), n),
        "stream_id": pa.repeat(pa.scalar(info.stream_id.bytes, pa.binary(16)), n),
        "block_id": pa.repeat(pa.scalar(info.block_id.bytes, pa.binary(16)), n),
        "insert_time": pa.repeat(pa.scalar(info.insert_time, TIMESTAMP), n),
        "exe": pa.repeat(pa.scalar(info.exe, pa.utf8()), n),
        "username": pa.repeat(pa.scalar(info.username, pa.utf8()), n),
        "computer": pa.repeat(pa.scalar(info.computer, pa.utf8()), n),
        "process_properties": pa.repeat(pa.scalar(info.process_properties, pa.utf8()), n),
        "trace_id": hex_array(b"".join(trace_ids), 16, n),
        "span_id": hex_array(b"".join(span_ids), 8, n),
        "parent_span_id": hex_array(b"".join(parents), 8, n, has_parent),
        "start_time": _ns_to_timestamp(start_arr),
        "end_time": _ns_to_timestamp(end_arr),
        "duration": pc.subtract(end_arr, start_arr),
        "name": name_arr,
        "kind": pc.take(_KIND_DICT, pa.array(kinds, pa.int8())),
        "status": pc.take(_STATUS_DICT, pa.array(statuses, pa.int8())),
        "status_message": msg_arr,
        "properties": pa.array(props, pa.utf8()),
        "events": pa.array(events, pa.utf8()),
        "links": pa.array(links, pa.utf8()),
    }
    return pa.Table.from_arrays([cols[c] for c in COLUMN_NAMES], schema=arrow_schema())
