"""OTLP trace requests -> blocks, with no I/O at all (testable without sockets).

A request body (protobuf or OTLP/JSON, already decompressed) is parsed into an
``ExportTraceServiceRequest``; each ``ResourceSpans`` with at least one span becomes one
:class:`Block` whose payload is that ``ResourceSpans`` re-serialised as protobuf, whatever the
request's encoding, so readers know one format.  Decoding stays minimal because it is the
receiver's hot path: per block we only re-serialise, count spans, take min/max times, check
ids and note each distinct trace id with its min start / max end (the trace index, issue 6).
Spans that :func:`otelspans_fdw.otlp.span_rejection` refuses are kept in the payload but
counted as rejected (reported in OTLP ``partial_success`` and skipped at materialisation, by
the same rule); a resource with no valid span is not stored at all.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError as ProtobufDecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans

from otelspans_fdw import otlp
from otelspans_fdw.exceptions import DecodeError
from otelspans_fdw.ingest import identity
from otelspans_fdw.otlp import ProcessInfo

__all__ = [
    "Block",
    "DecodedRequest",
    "ProcessInfo",
    "decode_request",
    "parse_json",
    "parse_protobuf",
    "response_for",
    "split_blocks",
]

_ID_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


@dataclass(slots=True)
class Block:
    """One ``ResourceSpans`` ready to be stored."""

    process: otlp.ProcessInfo
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
    #: spans of resources left out because none of their spans is valid
    rejected_only: int = 0

    @property
    def nb_spans(self) -> int:
        return sum(b.nb_spans for b in self.blocks) + self.rejected_only

    @property
    def nb_rejected(self) -> int:
        return sum(b.nb_rejected for b in self.blocks) + self.rejected_only

    @property
    def payload_size(self) -> int:
        return sum(len(b.payload) for b in self.blocks)


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


def _block(rs: ResourceSpans, out: DecodedRequest) -> None:
    """Add the block of a resource to ``out``; a resource with no span that
    :func:`otlp.span_rejection` accepts only adds to the rejected count (nothing of it would
    ever be queryable, so nothing is stored)."""
    nb = 0
    rejected = 0
    begin = 0
    end = 0
    traces: dict[bytes, list[int]] = {}
    rejection = otlp.span_rejection
    for ss in rs.scope_spans:
        for s in ss.spans:
            nb += 1
            st = s.start_time_unix_nano
            en = s.end_time_unix_nano
            tid = s.trace_id
            if rejection(tid, s.span_id, st, en) is not None:
                rejected += 1
                continue
            # Bounds over valid spans only: they go to bigint columns.
            if not begin or st < begin:
                begin = st
            if en > end:
                end = en
            # One dict probe per span: the distinct trace ids of the block for the trace index.
            t = traces.get(tid)
            if t is None:
                traces[tid] = [st, en]
            else:
                if st < t[0]:
                    t[0] = st
                if en > t[1]:
                    t[1] = en
    if nb == rejected:
        out.rejected_only += nb
        return
    proc = otlp.process_info(otlp.attributes_to_dict(rs.resource.attributes))
    payload = rs.SerializeToString()
    block = Block(
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
    out.blocks.append(block)


def split_blocks(req: ExportTraceServiceRequest) -> DecodedRequest:
    """One block per ``ResourceSpans`` that has spans; empty resources are skipped."""
    out = DecodedRequest()
    for rs in req.resource_spans:
        _block(rs, out)
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
            f"{decoded.nb_rejected} span(s) rejected: a trace_id/span_id of the wrong length or "
            "all zero, a zero start/end time, a time of 2^63 ns or more, or an end before the "
            "start; they will not be queryable"
        )
    return resp
