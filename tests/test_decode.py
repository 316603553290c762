"""Decoding one block (``otelspans_fdw.lake.decode``) against the independent expected rows."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span
from spans_helpers import T0_NS, arrow_rows, expected_rows, kvs, make_resource_spans, row_key

from otelspans_fdw.exceptions import DecodeError
from otelspans_fdw.lake._lazy_pb import RawResourceSpans
from otelspans_fdw.lake.decode import BlockInfo, decode_block, decode_blocks, hex_array
from otelspans_fdw.schema import arrow_schema

INFO = BlockInfo(
    process_id=uuid.UUID(int=1),
    stream_id=uuid.UUID(int=2),
    block_id=uuid.UUID(int=3),
    insert_time=dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC),
    exe="ns/checkout",
    username="alice",
    computer=None,
    process_properties='{"otel.resource.service.name":"checkout"}',
)


def expected(rs: ResourceSpans) -> list[dict]:
    rows = expected_rows(
        rs,
        process_id=INFO.process_id,
        stream_id=INFO.stream_id,
        block_id=INFO.block_id,
        insert_time=INFO.insert_time,
        exe=INFO.exe,
        username=INFO.username,
        computer=INFO.computer,
        process_properties=json.loads(INFO.process_properties),
    )
    return sorted(rows, key=row_key)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_matches_independent_rows(seed: int) -> None:
    rs = make_resource_spans(n=120, seed=seed)
    table = decode_block(rs.SerializeToString(), INFO)
    assert table.schema == arrow_schema()
    got = sorted(arrow_rows(table), key=row_key)
    want = expected(rs)
    assert len(want) == 120  # the four malformed spans are gone
    assert got == want


def test_mapping_details() -> None:
    rs = make_resource_spans(n=30, seed=5)
    rows = {r["span_id"]: r for r in arrow_rows(decode_block(rs.SerializeToString(), INFO))}
    spans = {s.span_id.hex(): s for ss in rs.scope_spans for s in ss.spans}
    roots = [r for r in rows.values() if r["parent_span_id"] is None]
    assert roots and all(len(spans[r["span_id"]].parent_span_id) != 8 for r in roots)
    assert {r["kind"] for r in rows.values()} == {
        "UNSPECIFIED",
        "INTERNAL",
        "SERVER",
        "CLIENT",
        "PRODUCER",
        "CONSUMER",
    }
    assert {r["status"] for r in rows.values()} == {"UNSET", "OK", "ERROR"}
    assert any(r["duration"] == 0 and r["start_time"] == r["end_time"] for r in rows.values())
    fancy = next(
        r
        for r in rows.values()
        if "nan" in r["properties"] and r["properties"].get("otel.scope.name") == "lib.a"
    )
    p = fancy["properties"]
    assert p["nan"] == "NaN" and p["inf"] == "Infinity" and p["ninf"] == "-Infinity"
    assert p["bytes"] == "AAH+" and p["arr"] == [1, "two", [3.0, None]]
    assert p["kv"] == {"a": 1, "b": {"c": [True]}} and p["dup"] == 2 and p["none"] is None
    assert p["nul"] == "a\ufffdb"
    assert p["otel.scope.name"] == "lib.a" and p["otel.scope.attr.lang"] == "py"
    assert p["otel.scope.schema_url"].startswith("https://")
    assert fancy["events"][0]["name"] == "exception" and fancy["events"][1]["attributes"] == {}
    assert fancy["links"][0]["attributes"] == {"why": "follows"}
    assert len(fancy["links"][0]["trace_id"]) == 32
    own = [r for r in rows.values() if r["properties"].get("otel.scope.name") == "mine"]
    assert own, "a span attribute wins over the scope extra with the same key"
    assert all(
        "otel.scope.version" not in r["properties"]
        for r in rows.values()
        if r["properties"].get("otel.scope.name") is None
    )


def test_json_text_is_valid_for_jsonb() -> None:
    """No NaN literals and no \\u0000 escapes: PostgreSQL's jsonb rejects both."""
    table = decode_block(make_resource_spans(n=40).SerializeToString(), INFO)
    for col in ("properties", "events", "links", "process_properties"):
        for text in table.column(col).to_pylist():
            assert "\\u0000" not in text and "NaN," not in text
            json.loads(text, parse_constant=lambda c, col=col: pytest.fail(f"{c} in {col}"))


def test_only_malformed_spans_give_empty_table() -> None:
    rs = make_resource_spans(n=0)
    table = decode_block(rs.SerializeToString(), INFO)
    assert table.num_rows == 0 and table.schema == arrow_schema()


def test_malformed_payload_raises_decode_error() -> None:
    with pytest.raises(DecodeError) as e:
        decode_block(b"\x0a\xff\xff\xff\xff\x0f garbage", INFO)
    assert str(INFO.block_id) in str(e.value)


def test_hex_array_with_nulls() -> None:
    arr = hex_array(b"\x00\xff" + b"\x12\x34" + b"\xab\xcd", 2, 3, [True, False, True])
    assert arr.to_pylist() == ["00ff", None, "abcd"]
    arr.validate(full=True)
    assert arr.type == pa.utf8()


# --- the columnar path against the per-span path and the independent decoding ----------------


def _payload(scopes: list[tuple[bytes, list[bytes]]]) -> bytes:
    """A ``ResourceSpans`` payload from serialized scopes and spans, written as given.

    Built with the wire-compatible raw message type, so spans may hold encodings protobuf
    serializers never write (explicit defaults, repeated singular fields).
    """
    raw = RawResourceSpans()
    for scope, spans in scopes:
        ss = raw.scope_spans.add()
        if scope:
            ss.scope = scope
        ss.spans.extend(spans)
    return raw.SerializeToString()


def _span(i: int, **extra: object) -> Span:
    s = Span(
        trace_id=(i + 1).to_bytes(16, "big"),  # never all zero: that id is invalid
        span_id=(i + 1).to_bytes(8, "big"),
        parent_span_id=(i + 2).to_bytes(8, "big") if i % 2 else b"",
        name=f"op-{i % 3}",
        kind=i % 6,
        start_time_unix_nano=T0_NS + i,
        end_time_unix_nano=T0_NS + 2 * i + 1,
    )
    s.attributes.extend(kvs({"k": i % 4, "route": f"/r/{i % 2}"}))
    for k, v in extra.items():
        setattr(s, k, v)
    return s


def both_paths(blocks: list[bytes]) -> pa.Table:
    """Decode with both paths; assert they agree (and with the independent rows)."""
    items = [(p, INFO) for p in blocks]
    fast = decode_blocks(items)
    slow = decode_blocks(items, columnar=False)
    assert fast.table.equals(slow.table)
    assert fast.errors.keys() == slow.errors.keys()
    want = sorted(
        (r for i, p in enumerate(blocks) if i not in fast.errors for r in expected(parse(p))),
        key=row_key,
    )
    assert sorted(arrow_rows(fast.table), key=row_key) == want
    return fast.table


def parse(payload: bytes) -> ResourceSpans:
    return ResourceSpans.FromString(payload)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_columnar_path_matches_per_span_path(seed: int) -> None:
    """Several blocks in one batch, scopes with and without extras, malformed spans."""
    sizes = [40, 47, 54]
    blocks = [make_resource_spans(n=n, seed=seed * 10 + n).SerializeToString() for n in sizes]
    blocks += [make_resource_spans(n=25, seed=seed, fancy=False).SerializeToString()]
    blocks += [make_resource_spans(n=0).SerializeToString()]
    table = both_paths(blocks)
    assert table.num_rows == sum(sizes) + 25


def test_encodings_serializers_never_write() -> None:
    """Explicit defaults and repeated singular fields: protobuf semantics (last one wins)."""
    kind_zero = _span(1).SerializeToString() + b"\x30\x00"  # kind = 0, explicitly
    name_empty = _span(2).SerializeToString() + b"\x2a\x00"  # name = "", explicitly
    twice = _span(3).SerializeToString() + Span(trace_id=b"\x07" * 16).SerializeToString()
    negative_kind = _span(4, kind=-3).SerializeToString()
    empty_attr = _span(5).SerializeToString() + b"\x4a\x00"  # an empty KeyValue
    plain = [_span(i).SerializeToString() for i in range(6, 30)]
    for odd in (kind_zero, name_empty, twice, empty_attr):
        rows = arrow_rows(both_paths([_payload([(b"", [*plain, odd])])]))
        assert len(rows) == len(plain) + 1
    both_paths([_payload([(b"", [kind_zero, name_empty, twice, empty_attr, *plain])])])
    # (spans_helpers would index KIND_NAMES with the negative number: checked here instead)
    items = [(_payload([(b"", [*plain, negative_kind])]), INFO)]
    fast, slow = decode_blocks(items).table, decode_blocks(items, columnar=False).table
    assert fast.equals(slow)
    assert fast.filter(pc.equal(fast.column("span_id"), (5).to_bytes(8, "big").hex()))[
        "kind"
    ].to_pylist() == ["UNSPECIFIED"]


def test_repeated_keys_and_scope_clashes_with_many_keys() -> None:
    """Over 63 distinct keys (hashed check) and a few (bit check), repeats and clashes."""
    scope = InstrumentationScope(name="lib", version="2").SerializeToString()
    spans = []
    for i in range(80):
        s = _span(i)
        s.attributes.extend(kvs({f"key{i}": i}))
        if i % 9 == 0:
            s.attributes.extend(kvs({"k": "again"}))  # repeated key: the last one wins
        if i % 11 == 0:
            s.attributes.extend(kvs({"otel.scope.name": "own"}))  # beats the scope extra
        spans.append(s.SerializeToString())
    rows = arrow_rows(both_paths([_payload([(scope, spans)])]))
    again = [r for r in rows if r["properties"]["k"] == "again"]
    assert len(again) == 9
    own = [r for r in rows if r["properties"]["otel.scope.name"] == "own"]
    assert len(own) == 8 and all(r["properties"]["otel.scope.version"] == "2" for r in own)
    both_paths([_payload([(scope, spans[:20]), (b"", spans[20:40])])])


def test_decode_blocks_isolates_bad_blocks() -> None:
    good = [make_resource_spans(n=20, seed=k).SerializeToString() for k in range(3)]
    # Spans the receiver rejects: skipped by the same rule, never a block error.
    too_late = _payload([(b"", [_span(1, end_time_unix_nano=2**63 + 5).SerializeToString()])])
    # An attribute value that is not a valid AnyValue: the block cannot be decoded.
    bad_attr = _span(2)
    bad_attr.attributes.add(key="x").value.string_value = "y"
    broken = bad_attr.SerializeToString().replace(b"\x12\x03\x0a\x01y", b"\x12\x03\x0a\x01\xff")
    bad_value = _payload([(b"", [broken])])
    blocks = [good[0], b"\x0a\xff\xff\xff\xff\x0f garbage", good[1], too_late, good[2], bad_value]
    got = decode_blocks([(p, INFO) for p in blocks])
    assert sorted(got.errors) == [1, 5]
    assert all(isinstance(e, DecodeError) for e in got.errors.values())
    assert str(INFO.block_id) in str(got.errors[5])
    assert got.table.num_rows == 60
    both_paths(blocks)
    assert decode_block(too_late, INFO).num_rows == 0
    with pytest.raises(DecodeError):
        decode_block(bad_value, INFO)


def test_blocks_keep_their_own_metadata_and_order() -> None:
    infos = [
        BlockInfo(
            uuid.UUID(int=10 + k),
            uuid.UUID(int=20 + k),
            uuid.UUID(int=30 + k),
            INFO.insert_time + dt.timedelta(seconds=k),
            f"exe{k}",
            None,
            f"host{k}",
            f'{{"k":{k}}}',
            f"svc{k}",
        )
        for k in range(3)
    ]
    payloads = [make_resource_spans(n=10, seed=k).SerializeToString() for k in range(3)]
    table = decode_blocks(list(zip(payloads, infos, strict=True))).table
    assert table.num_rows == 30
    for k, info in enumerate(infos):
        part = table.slice(10 * k, 10)
        assert part.column("block_id").unique().to_pylist() == [info.block_id.bytes]
        assert part.column("computer").unique().to_pylist() == [f"host{k}"]
        assert part.column("service_name").unique().to_pylist() == [f"svc{k}"]
        single = decode_block(payloads[k], info)
        assert single.equals(part)


def test_nul_keys_repeated_and_clashing_with_scope_keys() -> None:
    """``k\\0`` and ``k\\uFFFD`` are one key once cleaned: the last one wins, in both paths."""
    scope = InstrumentationScope(name="lib").SerializeToString()
    s = _span(3)
    del s.attributes[:]
    s.attributes.extend(kvs([("k\0", 1), ("k\0", 2), ("k\ufffd", 3), ("otel.scope.name\0", "x")]))
    t = _span(4)
    del t.attributes[:]
    t.attributes.extend(kvs([("a\0", 1), ("a\0", 2)]))
    rows = arrow_rows(
        both_paths([_payload([(scope, [s.SerializeToString(), t.SerializeToString()])])])
    )
    props = sorted((r["properties"] for r in rows), key=len)
    assert props[0] == {"otel.scope.name": "lib", "a\ufffd": 2}
    assert props[1] == {"otel.scope.name": "lib", "k\ufffd": 3, "otel.scope.name\ufffd": "x"}
