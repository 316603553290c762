"""Quals -> trace ids and the route a scan takes (issue 6), without a database."""

from __future__ import annotations

import datetime as dt
import uuid

from otelspans_fdw.lake.spans import route
from otelspans_fdw.multicorn_api import Qual
from otelspans_fdw.quals import scan_request

A = "4BF92F3577B34DA6A3CE929D0E0E4736"
B = "0af7651916cd43dd8448eb211c80319c"
T = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def test_trace_equality_and_lists_become_lowercase_trace_ids() -> None:
    req = scan_request([Qual("trace_id", "=", A)])
    assert req.trace_ids == frozenset({A.lower()}) and route(req) == "trace"
    assert [str(p) for p in req.predicates] == [f"trace_id = '{A}'"]  # rechecked as written
    req = scan_request([Qual("trace_id", ("=", True), [A, B, None])])
    assert req.trace_ids == frozenset({A.lower(), B})
    both = scan_request([Qual("trace_id", ("=", True), [A, B]), Qual("trace_id", "=", B)])
    assert both.trace_ids == frozenset({B})


def test_disjoint_or_null_trace_ids_match_nothing() -> None:
    req = scan_request([Qual("trace_id", "=", A), Qual("trace_id", "=", B)])
    assert req.trace_ids == frozenset() and req.is_empty
    assert scan_request([Qual("trace_id", "=", None)]).is_empty
    # <> and ALL (...) do not name traces.
    assert scan_request([Qual("trace_id", "<>", A)]).trace_ids is None
    assert scan_request([Qual("trace_id", ("=", False), [A])]).trace_ids is None


def test_routes() -> None:
    pid = uuid.uuid4()
    assert route(scan_request([Qual("process_id", "=", str(pid))])) == "process"
    both = scan_request([Qual("process_id", "=", str(pid)), Qual("trace_id", "=", B)])
    assert route(both) == "process"
    assert route(scan_request([Qual("start_time", ">=", T)])) == "window"
    assert route(scan_request([Qual("end_time", ">", T)])) == "window"
    assert route(scan_request([Qual("start_time", "<=", T)])) == "none"
    assert route(scan_request([Qual("name", "=", "x")])) == "none"
    assert route(scan_request([])) == "none"


def test_service_name_is_a_pushable_text_column() -> None:
    req = scan_request([Qual("service_name", "=", "cart"), Qual("service_name", "<", "m")])
    assert [str(p) for p in req.predicates] == ["service_name = 'cart'"]
