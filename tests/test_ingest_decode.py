"""I/O-free decoding: identity, blocks, JSON, rejected spans, gzip limits (no sockets)."""

from __future__ import annotations

import base64
import gzip
import json
import uuid

import pytest
from google.protobuf import json_format
from ingest_helpers import make_request

from otelspans_fdw.exceptions import DecodeError, PayloadTooLargeError, UnsupportedMediaTypeError
from otelspans_fdw.ingest import identity
from otelspans_fdw.ingest.body import GzipDecoder, decode_content, is_json_content_type
from otelspans_fdw.ingest.decode import decode_request, parse_json, response_for, split_blocks


def otlp_json(req) -> bytes:
    """OTLP/JSON as the specification writes it: hex ids, camelCase keys."""
    doc = json_format.MessageToDict(req)
    for rs in doc["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for s in ss["spans"]:
                for k in ("traceId", "spanId", "parentSpanId"):
                    if k in s:
                        s[k] = base64.b64decode(s[k]).hex()
    return json.dumps(doc).encode()


def test_process_id_is_documented_uuid5_of_key() -> None:
    attrs = {"service.name": " Checkout ", "process.pid": 42, "host.name": "H1"}
    pid = identity.process_id(attrs)
    assert pid.version == 5
    key = identity.process_key(attrs)
    assert key.split("\x1f")[identity.PROCESS_KEY_ATTRIBUTES.index("service.name")] == "checkout"
    assert pid == uuid.uuid5(identity.PROCESS_NAMESPACE, key)
    # not an attribute of the identity: same process
    assert identity.process_id({**attrs, "deployment.environment": "prod"}) == pid
    for other in ({"process.pid": 43}, {"host.name": "h2"}, {"service.instance.id": "x"}):
        assert identity.process_id({**attrs, **other}) != pid


def test_blocks_one_per_resource_with_spans_and_ids_from_payload() -> None:
    req = make_request(4, extra_resources=2)
    req.resource_spans.add().resource.attributes.add(key="service.name").value.string_value = "e"
    d = split_blocks(req)
    assert len(d.blocks) == 3  # the empty resource is skipped
    assert d.nb_spans == 12 and d.nb_rejected == 0
    b = d.blocks[0]
    assert b.payload == req.resource_spans[0].SerializeToString()
    assert b.block_id == identity.uuid5_bytes(identity.BLOCK_NAMESPACE, b.payload)
    assert b.stream_id == identity.stream_id(b.process.process_id)
    assert b.object_path == f"blobs/{b.process.process_id}/{b.stream_id}/{b.block_id}"
    assert b.process.exe == "checkout" and b.process.computer == "host-a"
    assert b.process.properties["otel.resource.process.pid"] == 100
    assert (b.begin_ns, b.end_ns) == (
        min(s.start_time_unix_nano for s in req.resource_spans[0].scope_spans[0].spans),
        max(s.end_time_unix_nano for s in req.resource_spans[0].scope_spans[0].spans),
    )
    assert len({x.process.process_id for x in d.blocks}) == 3
    assert split_blocks(req).blocks[1].block_id == d.blocks[1].block_id  # deterministic


def test_exe_namespace_username_and_creation_time() -> None:
    req = make_request(1)
    attrs = req.resource_spans[0].resource.attributes
    for k, v in (
        ("service.namespace", "shop"),
        ("process.owner", "alice"),
        ("os.description", "Debian 12"),
        ("process.creation.time", "2024-01-02T03:04:05Z"),
    ):
        attrs.add(key=k).value.string_value = v
    p = split_blocks(req).blocks[0].process
    assert (p.exe, p.username, p.distro, p.service_name) == (
        "shop/checkout",
        "alice",
        "Debian 12",
        "checkout",
    )
    assert p.start_time_ns == 1704164645 * 10**9


def test_bad_ids_and_zero_times_are_counted_rejected() -> None:
    req = make_request(5)
    spans = req.resource_spans[0].scope_spans[0].spans
    spans[0].trace_id = b"short"
    spans[1].span_id = b""
    spans[2].start_time_unix_nano = 0
    spans[3].end_time_unix_nano = 0
    d = split_blocks(req)
    assert (d.nb_spans, d.nb_rejected) == (5, 4)
    resp = response_for(d)
    assert resp.partial_success.rejected_spans == 4 and resp.partial_success.error_message
    assert not response_for(split_blocks(make_request(2))).HasField("partial_success")


def test_json_request_gives_same_payload_as_protobuf() -> None:
    req = make_request(3, extra_resources=1)
    req.resource_spans[0].scope_spans[0].spans[1].parent_span_id = b"\x01" * 8
    from_json = decode_request(otlp_json(req), json_encoded=True)
    from_pb = decode_request(req.SerializeToString())
    assert [b.payload for b in from_json.blocks] == [b.payload for b in from_pb.blocks]
    # enums as integers and snake_case keys are accepted too
    doc = json.loads(otlp_json(req))
    doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["kind"] = 2
    doc["resource_spans"] = doc.pop("resourceSpans")
    assert decode_request(json.dumps(doc).encode(), json_encoded=True).nb_spans == 6


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        b'{"resourceSpans": 5}',
        b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"zz"}]}]}]}',
    ],
)
def test_malformed_json_raises(body: bytes) -> None:
    with pytest.raises(DecodeError):
        parse_json(body)


def test_malformed_protobuf_raises() -> None:
    with pytest.raises(DecodeError):
        decode_request(b"\xff\xff\xff\xff not protobuf")


def test_content_types() -> None:
    assert is_json_content_type("application/json; charset=utf-8")
    assert not is_json_content_type("application/x-protobuf")
    with pytest.raises(UnsupportedMediaTypeError):
        is_json_content_type("text/plain")
    with pytest.raises(UnsupportedMediaTypeError):
        decode_content([b"x"], "br", 100)


def test_body_limits_before_and_after_gzip() -> None:
    assert decode_content([b"ab", b"cd"], "", 4) == b"abcd"
    with pytest.raises(PayloadTooLargeError, match="before"):
        decode_content([b"abc", b"de"], "identity", 4)
    data = b"x" * 1000
    assert decode_content([gzip.compress(data)], "gzip", 1000) == data
    with pytest.raises(PayloadTooLargeError, match="after"):
        decode_content([gzip.compress(data)], "gzip", 999)
    with pytest.raises(DecodeError):
        decode_content([b"not gzip at all"], "gzip", 1000)
    with pytest.raises(DecodeError, match="truncated"):
        decode_content([gzip.compress(data)[:-20]], "gzip", 1000)


def test_gzip_bomb_is_refused_while_streaming() -> None:
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)  # 64 MiB -> ~64 KiB
    dec = GzipDecoder(1024 * 1024)
    with pytest.raises(PayloadTooLargeError):
        for i in range(0, len(bomb), 4096):
            dec.feed(bomb[i : i + 4096])
    assert sum(len(p) for p in dec._parts) <= 1024 * 1024  # never held more than the limit
