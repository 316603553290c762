"""OTLP trace requests -> blocks, with no I/O at all (testable without sockets).

A request body (protobuf or OTLP/JSON, already decompressed) is parsed into an
``ExportTraceServiceRequest``; each ``ResourceSpans`` with at least one span becomes one
:class:`Block` whose payload is that ``ResourceSpans`` re-serialised as protobuf, whatever the
request's encoding, so readers know one format.  Decoding stays minimal because it is the
receiver's hot path: per block we only re-serialise, count spans, take min/max times, check
ids and note each distinct trace id with its min start / max end (the trace index, issue 6).
Spans with bad trace/span id lengths or zero timestamps are kept in the payload but counted
as rejected (reported in OTLP ``partial_success`` and skipped at materialisation).
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError as ProtobufDecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans

from otelspans_fdw.exceptions import DecodeError
from otelspans_fdw.ingest import identity

__all__ = [
    "Block",
    "DecodedRequest",
    "ProcessInfo",
    "anyvalue_to_py",
    "decode_request",
    "parse_json",
    "parse_protobuf",
    "response_for",
    "split_blocks",
]

_ID_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """The ``otel_processes`` row of a resource (first write wins in the database)."""

    process_id: uuid.UUID
    exe: str | None
    username: str | None
    computer: str | None
    distro: str | None
    service_name: str | None
    start_time_ns: int | None  # from process.creation.time; None -> the first block's begin
    properties: dict[str, Any]


@dataclass(slots=True)
class Block:
    """One ``ResourceSpans`` ready to be stored."""

    process: ProcessInfo
    stream_id: uuid.UUID
    block_id: uuid.UUID
    payload: bytes
    nb_spans: int
    nb_rejected: int
    begin_ns: int | None
    end_ns: int | None
    #: distinct valid trace ids of the block -> [min start ns, max end ns] of their spans here
    traces: dict[bytes, list[int]] = field(default_factory=dict)

    @property
    def object_path(self) -> str:
        return identity.object_path(self.process.process_id, self.stream_id, self.block_id)


@dataclass(slots=True)
class DecodedRequest:
    """The blocks of one export request and the totals reported back to the client."""

    blocks: list[Block] = field(default_factory=list)

    @property
    def nb_spans(self) -> int:
        return sum(b.nb_spans for b in self.blocks)

    @property
    def nb_rejected(self) -> int:
        return sum(b.nb_rejected for b in self.blocks)

    @property
    def payload_size(self) -> int:
        return sum(len(b.payload) for b in self.blocks)


def anyvalue_to_py(v: AnyValue) -> Any:
    """OTLP ``AnyValue`` as JSON-able Python (bytes as base64; absent value -> None)."""
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [anyvalue_to_py(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: anyvalue_to_py(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return base64.b64encode(v.bytes_value).decode("ascii")
    return getattr(v, kind)


def parse_protobuf(body: bytes) -> ExportTraceServiceRequest:
    """Parse a binary protobuf request; :class:`DecodeError` if malformed."""
    req = ExportTraceServiceRequest()
    try:
        req.ParseFromString(body)
    except ProtobufDecodeError as e:
        raise DecodeError(f"malformed protobuf request: {e}") from e
    return req


def _hex_ids_to_base64(obj: Any) -> None:
    """OTLP/JSON writes trace and span ids as hex, protobuf JSON expects base64: convert."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in _ID_FIELDS and isinstance(v, str):
                try:
                    obj[k] = base64.b64encode(bytes.fromhex(v)).decode("ascii")
                except ValueError as e:
                    raise DecodeError(f"{k} {v[:40]!r} is not hex") from e
            elif isinstance(v, dict | list):
                _hex_ids_to_base64(v)
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, dict | list):
                _hex_ids_to_base64(v)


def parse_json(body: bytes) -> ExportTraceServiceRequest:
    """Parse an OTLP/JSON request (hex ids, camelCase or snake_case keys, unknown keys ignored)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise DecodeError(f"malformed JSON request: {e}") from e
    if not isinstance(doc, dict):
        raise DecodeError("malformed JSON request: top level is not an object")
    _hex_ids_to_base64(doc)
    req = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(doc, req, ignore_unknown_fields=True)
    except (json_format.ParseError, binascii.Error, ValueError, TypeError, RecursionError) as e:
        raise DecodeError(f"invalid OTLP JSON request: {e}") from e
    return req


def _parse_time_ns(value: Any) -> int | None:
    """``process.creation.time``: ISO 8601 text (semantic conventions) or integer ns."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value > 0 else None
    if isinstance(value, str) and value.strip():
        try:
            dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
        if dt.tzinfo is None:
            return None
        return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000
    return None


def _first(attrs: dict[str, Any], *keys: str) -> str | None:
    for k in keys:
        v = attrs.get(k)
        if v not in (None, ""):
            return str(v)
    return None


def process_info(attrs: dict[str, Any]) -> ProcessInfo:
    """The process row of a resource, from its attributes as plain Python values."""
    name = _first(attrs, "service.name")
    ns = _first(attrs, "service.namespace")
    exe = f"{ns}/{name}" if ns and name else name
    return ProcessInfo(
        process_id=identity.process_id(attrs),
        exe=exe,
        username=_first(attrs, "process.owner", "process.user.name", "user.name"),
        computer=_first(attrs, "host.name"),
        distro=_first(attrs, "os.description"),
        service_name=name,
        start_time_ns=_parse_time_ns(attrs.get("process.creation.time")),
        properties={f"otel.resource.{k}": v for k, v in attrs.items()},
    )


def _block(rs: ResourceSpans) -> Block | None:
    nb = 0
    rejected = 0
    begin = 0
    end = 0
    traces: dict[bytes, list[int]] = {}
    for ss in rs.scope_spans:
        for s in ss.spans:
            nb += 1
            st = s.start_time_unix_nano
            en = s.end_time_unix_nano
            if st and (not begin or st < begin):
                begin = st
            if en > end:
                end = en
            tid = s.trace_id
            if not st or not en or len(tid) != 16 or len(s.span_id) != 8:
                rejected += 1
                continue
            # One dict probe per span: the distinct trace ids of the block for the trace index.
            t = traces.get(tid)
            if t is None:
                traces[tid] = [st, en]
            else:
                if st < t[0]:
                    t[0] = st
                if en > t[1]:
                    t[1] = en
    if nb == 0:
        return None
    attrs = {kv.key: anyvalue_to_py(kv.value) for kv in rs.resource.attributes}
    proc = process_info(attrs)
    payload = rs.SerializeToString()
    return Block(
        process=proc,
        stream_id=identity.stream_id(proc.process_id),
        block_id=identity.block_id(payload),
        payload=payload,
        nb_spans=nb,
        nb_rejected=rejected,
        begin_ns=begin or None,
        end_ns=end or None,
        traces=traces,
    )


def split_blocks(req: ExportTraceServiceRequest) -> DecodedRequest:
    """One block per ``ResourceSpans`` that has spans; empty resources are skipped."""
    out = DecodedRequest()
    for rs in req.resource_spans:
        b = _block(rs)
        if b is not None:
            out.blocks.append(b)
    return out


def decode_request(body: bytes, *, json_encoded: bool = False) -> DecodedRequest:
    """Parse and split a (decompressed) request body."""
    req = parse_json(body) if json_encoded else parse_protobuf(body)
    return split_blocks(req)


def response_for(decoded: DecodedRequest) -> ExportTraceServiceResponse:
    """The OTLP response: ``partial_success`` only when some spans were rejected."""
    resp = ExportTraceServiceResponse()
    if decoded.nb_rejected:
        resp.partial_success.rejected_spans = decoded.nb_rejected
        resp.partial_success.error_message = (
            f"{decoded.nb_rejected} span(s) have an invalid trace_id/span_id length or a zero "
            "start/end time; they are stored but will not be queryable"
        )
    return resp
