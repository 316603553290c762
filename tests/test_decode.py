"""Decoding one block (``otelspans_fdw.lake.decode``) against the independent expected rows."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pyarrow as pa
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans
from spans_helpers import arrow_rows, expected_rows, make_resource_spans, row_key

from otelspans_fdw.exceptions import DecodeError
from otelspans_fdw.lake.decode import BlockInfo, decode_block, hex_array
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
