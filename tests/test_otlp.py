"""The OTLP rules of ``otelspans_fdw.otlp``, on values: no sockets, no database."""

from __future__ import annotations

import json
import math

import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList

from otelspans_fdw import otlp

TID = bytes(range(1, 17))
SID = bytes(range(1, 9))
T = 1_700_000_000_000_000_000


@pytest.mark.parametrize(
    ("trace_id", "span_id", "start", "end", "reason"),
    [
        (TID, SID, T, T + 1, None),
        (TID, SID, T, T, None),  # zero duration is fine
        (TID[:15], SID, T, T + 1, "invalid trace_id"),
        (TID + b"\1", SID, T, T + 1, "invalid trace_id"),
        (b"\0" * 16, SID, T, T + 1, "invalid trace_id"),
        (TID, b"\0" * 8, T, T + 1, "invalid span_id"),
        (TID, SID[:7], T, T + 1, "invalid span_id"),
        (TID, SID, 0, T, "zero start or end time"),
        (TID, SID, T, 0, "zero start or end time"),
        (TID, SID, T, 2**63, "time beyond 2^63 ns"),
        (TID, SID, 2**63, 2**64 - 1, "time beyond 2^63 ns"),
        (TID, SID, T, 2**63 - 1, None),
        (TID, SID, T + 1, T, "end time before start time"),
    ],
)
def test_span_rejection(trace_id: bytes, span_id: bytes, start: int, end: int, reason) -> None:
    assert otlp.span_rejection(trace_id, span_id, start, end) == reason


def test_parent_ids() -> None:
    assert otlp.parent_or_none(SID) == SID
    assert otlp.parent_or_none(b"") is None
    assert otlp.parent_or_none(b"\0" * 8) is None
    assert otlp.parent_or_none(SID + b"\1") is None


def test_kind_and_status_names_come_from_the_enums() -> None:
    assert otlp.KINDS == ("UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER")
    assert otlp.STATUSES == ("UNSET", "OK", "ERROR")


def _kv(key: str, **value: object) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(**value))


def test_anyvalue_rules_give_text_postgresql_can_store() -> None:
    attrs = [
        _kv("s", string_value="python\0app.py"),
        _kv("nan", double_value=math.nan),
        _kv("inf", double_value=math.inf),
        _kv("ninf", double_value=-math.inf),
        _kv("d", double_value=1.5),
        _kv("b", bytes_value=b"\0\1"),
        _kv("none"),
        _kv("arr", array_value=ArrayValue(values=[AnyValue(int_value=1), AnyValue()])),
        _kv("kv", kvlist_value=KeyValueList(values=[_kv("x\0", bool_value=True)])),
        _kv("dup", int_value=1),
        _kv("dup", int_value=2),
        _kv("n\0", int_value=1),
        _kv("n\ufffd", int_value=2),
    ]
    got = otlp.attributes_to_dict(attrs)
    assert got == {
        "s": "python\ufffdapp.py",
        "nan": "NaN",
        "inf": "Infinity",
        "ninf": "-Infinity",
        "d": 1.5,
        "b": "AAE=",
        "none": None,
        "arr": [1, None],
        "kv": {"x\ufffd": True},
        "dup": 2,
        "n\ufffd": 2,
    }
    text = json.dumps(got, allow_nan=False)  # NaN would raise here
    assert "\\u0000" not in text


def test_clean_text_replaces_lone_surrogates() -> None:
    assert otlp.clean_text("a\ud800b\udfff") == "a\ufffdb\ufffd"
    assert otlp.clean_text("ok \U0001f600") == "ok \U0001f600"
    otlp.clean_text("a\ud800").encode("utf-8")  # now encodable


def test_process_fields() -> None:
    attrs = otlp.attributes_to_dict(
        [
            _kv("service.name", string_value="cart\0"),
            _kv("service.namespace", string_value="shop"),
            _kv("host.name", string_value="h\0"),
            _kv("process.owner", string_value="alice"),
            _kv("process.creation.time", string_value="3000-01-01T00:00:00Z"),
            _kv("weird", double_value=math.nan),
        ]
    )
    p = otlp.process_info(attrs)
    assert (p.exe, p.service_name, p.computer, p.username) == (
        "shop/cart\ufffd",
        "cart\ufffd",
        "h\ufffd",
        "alice",
    )
    assert p.start_time_ns is None  # out of range: the first block's begin is used
    assert p.properties["otel.resource.weird"] == "NaN"
    # The identity folds case: the same process whatever the case of its attributes.
    upper = otlp.process_info({"service.name": "Cart/A1"})
    lower = otlp.process_info({"service.name": "cart/a1"})
    assert upper.process_id == lower.process_id and upper.service_name == "Cart/A1"
