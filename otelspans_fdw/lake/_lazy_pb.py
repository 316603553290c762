"""Wire-compatible "lazy" and "columnar" views of the OTLP trace messages, for fast decoding.

The official ``Span`` message makes every attribute a ``KeyValue`` object; with the upb
backend each attribute then costs four Python-level accesses (key, value, which-oneof, the
value), and attributes dominate decoding time.  These message types declare the same field
numbers with cheaper types: ``attributes``, ``events``, ``links``, ``status`` and the scope are
``bytes``, so upb hands back each attribute's serialized ``KeyValue`` as one ``bytes`` object.
The decoder caches the JSON fragment of each distinct attribute encoding (``http.method=GET``
appears thousands of times in a block) and parses only the ones it has not seen.

Even one Python attribute access per span field is too slow for the cold path (about 60 ns
each, a dozen per span), so the decoder normally does not build span objects at all:

* :data:`RawResourceSpans` leaves every span serialized (``spans`` is ``repeated bytes``);
* the decoder concatenates the spans of a scope, each preceded by :data:`SENTINEL_PREFIX`,
  and parses the result *once* as :data:`SpanColumns`, whose fields are all ``repeated``:
  protobuf appends each occurrence of a repeated field, so the parse yields one column per
  field, in C.  The prefix holds one sentinel occurrence of every field (its default value),
  which marks where each span starts in every column: absent fields and repeated attributes
  stay aligned.

The wire format is the same, so a payload parses with all of these; fields we do not declare
(resource, trace_state, flags, dropped counts) stay unknown fields and are ignored.  Strings
keep their ``string`` type, so invalid UTF-8 fails the parse exactly as with the official
classes.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = [
    "SENTINEL_PREFIX",
    "LazyEvent",
    "LazyLink",
    "LazyResourceSpans",
    "LazySpan",
    "RawResourceSpans",
    "SpanColumns",
]

_F = descriptor_pb2.FieldDescriptorProto
_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_PKG = "otelspans.lazy.v1"

#: Fields the decoder reads, as (name, number, type, repeated in OTLP); the rest stay unknown.
#: Messages inside are ``bytes``: left serialized.
_Fields = list[tuple[str, int, int, bool]]
_SPAN_FIELDS: _Fields = [
    ("trace_id", 1, _F.TYPE_BYTES, False),
    ("span_id", 2, _F.TYPE_BYTES, False),
    ("parent_span_id", 4, _F.TYPE_BYTES, False),
    ("name", 5, _F.TYPE_STRING, False),
    ("kind", 6, _F.TYPE_INT32, False),
    ("start_time_unix_nano", 7, _F.TYPE_FIXED64, False),
    ("end_time_unix_nano", 8, _F.TYPE_FIXED64, False),
    ("attributes", 9, _F.TYPE_BYTES, True),
    ("events", 11, _F.TYPE_BYTES, True),
    ("links", 13, _F.TYPE_BYTES, True),
    ("status", 15, _F.TYPE_BYTES, False),
]
_EVENT_FIELDS: _Fields = [
    ("time_unix_nano", 1, _F.TYPE_FIXED64, False),
    ("name", 2, _F.TYPE_STRING, False),
    ("attributes", 3, _F.TYPE_BYTES, True),
]
_LINK_FIELDS: _Fields = [
    ("trace_id", 1, _F.TYPE_BYTES, False),
    ("span_id", 2, _F.TYPE_BYTES, False),
    ("attributes", 4, _F.TYPE_BYTES, True),
]


def _message(
    name: str, fields: list[tuple[str, int, int, int, str]]
) -> descriptor_pb2.DescriptorProto:
    msg = descriptor_pb2.DescriptorProto(name=name)
    for fname, number, ftype, label, type_name in fields:
        f = msg.field.add(name=fname, number=number, type=ftype, label=label)
        if type_name:
            f.type_name = type_name
    return msg


def _lazy(name: str, fields: _Fields) -> descriptor_pb2.DescriptorProto:
    """The message with its own field labels."""
    return _message(name, [(n, num, t, _REP if r else _OPT, "") for n, num, t, r in fields])


def _columns(name: str, fields: _Fields) -> descriptor_pb2.DescriptorProto:
    """The message with every field repeated: a parse of concatenated messages gives columns."""
    return _message(name, [(n, num, t, _REP, "") for n, num, t, _ in fields])


def _build() -> descriptor_pool.DescriptorPool:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="otelspans/lazy_trace.proto", package=_PKG, syntax="proto3"
    )
    b, s, rep = _F.TYPE_BYTES, _F.TYPE_STRING, _REP
    fdp.message_type.extend(
        [
            _lazy("LazySpan", _SPAN_FIELDS),
            _columns("SpanColumns", _SPAN_FIELDS),
            _lazy("LazyEvent", _EVENT_FIELDS),
            _lazy("LazyLink", _LINK_FIELDS),
            _message(
                "LazyScopeSpans",
                [
                    ("scope", 1, b, _OPT, ""),
                    ("spans", 2, _F.TYPE_MESSAGE, rep, f".{_PKG}.LazySpan"),
                    ("schema_url", 3, s, _OPT, ""),
                ],
            ),
            _message(
                "LazyResourceSpans",
                [("scope_spans", 2, _F.TYPE_MESSAGE, rep, f".{_PKG}.LazyScopeSpans")],
            ),
            _message(
                "RawScopeSpans",
                [
                    ("scope", 1, b, _OPT, ""),
                    ("spans", 2, b, rep, ""),
                    ("schema_url", 3, s, _OPT, ""),
                ],
            ),
            _message(
                "RawResourceSpans",
                [("scope_spans", 2, _F.TYPE_MESSAGE, rep, f".{_PKG}.RawScopeSpans")],
            ),
        ]
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return pool


_POOL = _build()


def _cls(name: str) -> Any:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{_PKG}.{name}"))


def _sentinels(cls: Any, fields: _Fields) -> bytes:
    """One occurrence of every field of the columns message ``cls``, at its default value.

    Written before each message of a concatenation, it marks where each message starts in
    every column: for a singular field the default means the same as an absent field.  A
    message's own occurrence equal to the default (protobuf serializers omit defaults; but an
    empty serialized attribute, event or link is possible) breaks the count of one sentinel
    per message, which the decoder checks: it then decodes those messages one by one.
    """
    default = {_F.TYPE_BYTES: b"", _F.TYPE_STRING: ""}
    return cls(**{n: [default.get(t, 0)] for n, _, t, _r in fields}).SerializeToString()


#: ``ResourceSpans`` with attributes, events, links, status and scope left serialized.
LazyResourceSpans: Any = _cls("LazyResourceSpans")
#: ``Span`` with attributes, events, links and status left serialized.
LazySpan: Any = _cls("LazySpan")
#: ``ResourceSpans`` with the scope and every span left serialized.
RawResourceSpans: Any = _cls("RawResourceSpans")
#: ``Span.Event`` / ``Span.Link`` with their attributes left serialized.
LazyEvent: Any = _cls("LazyEvent")
LazyLink: Any = _cls("LazyLink")
#: The span fields, every one ``repeated``: parsing concatenated spans (each behind
#: :data:`SENTINEL_PREFIX`) gives columns.
SpanColumns: Any = _cls("SpanColumns")
SENTINEL_PREFIX: bytes = _sentinels(SpanColumns, _SPAN_FIELDS)
