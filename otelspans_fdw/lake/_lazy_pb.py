"""Wire-compatible "lazy" views of the OTLP trace messages, for fast decoding.

The official ``Span`` message makes every attribute a ``KeyValue`` object; with the upb
backend each attribute then costs four Python-level accesses (key, value, which-oneof, the
value), and attributes dominate decoding time.  These message types declare the same field
numbers with cheaper types: ``attributes``, ``events``, ``links``, ``status`` and the scope are
``bytes``, so upb hands back each attribute's serialized ``KeyValue`` as one ``bytes`` object.
The decoder caches the JSON fragment of each distinct attribute encoding (``http.method=GET``
appears thousands of times in a block) and parses only the ones it has not seen.

The wire format is the same, so a payload parses with both; fields we do not declare (resource,
trace_state, flags, dropped counts) stay unknown fields and are ignored.  Strings keep their
``string`` type, so invalid UTF-8 fails the parse exactly as with the official classes.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["LazyResourceSpans"]

_F = descriptor_pb2.FieldDescriptorProto
_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED


def _message(
    name: str, fields: list[tuple[str, int, int, int, str]]
) -> descriptor_pb2.DescriptorProto:
    msg = descriptor_pb2.DescriptorProto(name=name)
    for fname, number, ftype, label, type_name in fields:
        f = msg.field.add(name=fname, number=number, type=ftype, label=label)
        if type_name:
            f.type_name = type_name
    return msg


def _build() -> Any:
    pkg = "otelspans.lazy.v1"
    fdp = descriptor_pb2.FileDescriptorProto(
        name="otelspans/lazy_trace.proto", package=pkg, syntax="proto3"
    )
    fdp.message_type.extend(
        [
            _message(
                "LazySpan",
                [
                    ("trace_id", 1, _F.TYPE_BYTES, _OPT, ""),
                    ("span_id", 2, _F.TYPE_BYTES, _OPT, ""),
                    ("parent_span_id", 4, _F.TYPE_BYTES, _OPT, ""),
                    ("name", 5, _F.TYPE_STRING, _OPT, ""),
                    ("kind", 6, _F.TYPE_INT32, _OPT, ""),
                    ("start_time_unix_nano", 7, _F.TYPE_FIXED64, _OPT, ""),
                    ("end_time_unix_nano", 8, _F.TYPE_FIXED64, _OPT, ""),
                    ("attributes", 9, _F.TYPE_BYTES, _REP, ""),
                    ("events", 11, _F.TYPE_BYTES, _REP, ""),
                    ("links", 13, _F.TYPE_BYTES, _REP, ""),
                    ("status", 15, _F.TYPE_BYTES, _OPT, ""),
                ],
            ),
            _message(
                "LazyScopeSpans",
                [
                    ("scope", 1, _F.TYPE_BYTES, _OPT, ""),
                    ("spans", 2, _F.TYPE_MESSAGE, _REP, f".{pkg}.LazySpan"),
                    ("schema_url", 3, _F.TYPE_STRING, _OPT, ""),
                ],
            ),
            _message(
                "LazyResourceSpans",
                [("scope_spans", 2, _F.TYPE_MESSAGE, _REP, f".{pkg}.LazyScopeSpans")],
            ),
        ]
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{pkg}.LazyResourceSpans"))


#: ``ResourceSpans`` with attributes, events, links, status and scope left serialized.
LazyResourceSpans: Any = _build()
