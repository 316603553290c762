"""Quals -> scan request (otelspans_fdw.quals) and its pyarrow translation (lake.filters)."""

from __future__ import annotations

import datetime as dt
import operator
import random
import uuid

import pyarrow as pa
import pytest
from spans_helpers import T0_NS, arrow_rows, make_resource_spans, ns_to_dt

from otelspans_fdw.lake.decode import BlockInfo, decode_block
from otelspans_fdw.lake.filters import request_expression
from otelspans_fdw.multicorn_api import Qual
from otelspans_fdw.quals import Predicate, TimeWindow, scan_request

P1, P2, P3 = (uuid.UUID(int=i) for i in (1, 2, 3))
T0 = ns_to_dt(T0_NS)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_process_ids_from_eq_in_any_and_intersection() -> None:
    assert scan_request([Qual("process_id", "=", P1)]).process_ids == {P1}
    assert scan_request([Qual("process_id", ("=", True), [P1, P2])]).process_ids == {P1, P2}
    both = scan_request([Qual("process_id", ("=", True), [P1, P2]), Qual("process_id", "=", P2)])
    assert both.process_ids == {P2}
    assert scan_request([Qual("process_id", "=", str(P3))]).process_ids == {P3}
    assert scan_request([]).process_ids is None
    assert scan_request([Qual("process_id", "<>", P1)]).process_ids is None
    assert scan_request([Qual("process_id", ("<>", False), [P1])]).process_ids is None
    nothing = scan_request([Qual("process_id", "=", None)])
    assert nothing.process_ids == frozenset() and nothing.is_empty


def test_time_quals_give_the_window() -> None:
    req = scan_request(
        [
            Qual("start_time", ">=", at(10)),
            Qual("start_time", "<=", at(100)),
            Qual("end_time", ">", at(20)),
            Qual("end_time", "<", at(90)),
            Qual("process_id", "=", P1),
        ]
    )
    assert req.window == TimeWindow(at(20), at(90))
    assert scan_request([Qual("start_time", "=", at(5))]).window == TimeWindow(at(5), at(5))
    assert scan_request([Qual("end_time", "<=", at(5))]).window == TimeWindow(None, at(5))
    lst = scan_request([Qual("start_time", ("=", True), [at(3), at(1), at(2)])])
    assert lst.window == TimeWindow(at(1), at(3))
    assert scan_request([Qual("start_time", ">", at(9)), Qual("end_time", "<", at(1))]).is_empty
    assert scan_request([Qual("start_time", ">", None)]).is_empty


def test_predicates_pushed_and_not_pushed() -> None:
    req = scan_request(
        [
            Qual("name", "=", "op-1"),
            Qual("name", "<", "z"),  # text order is the collation's: not pushed
            Qual("kind", ("=", True), ["SERVER", "CLIENT"]),
            Qual("status_message", "=", None),
            Qual("parent_span_id", "<>", None),
            Qual("duration", ">", 100),
            Qual("duration", "<", 1.5),  # a float: not pushed
            Qual("properties", "=", "{}"),  # jsonb: not pushed
            Qual("name", "~~", "op%"),  # LIKE: not pushed
        ]
    )
    assert set(req.predicates) == {
        Predicate("name", "=", "op-1"),
        Predicate("kind", "in", ("SERVER", "CLIENT")),
        Predicate("status_message", "is_null"),
        Predicate("parent_span_id", "not_null"),
        Predicate("duration", ">", 100),
    }


OPS = {"=": operator.eq, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def sql_match(row: dict, q: Qual) -> bool:
    """PostgreSQL's meaning of one qual on one row (NULL never compares)."""
    v = row[q.field_name]
    if isinstance(q.operator, tuple):
        return v is not None and v in q.value
    if q.value is None:
        return (v is None) if q.operator == "=" else (v is not None)
    if v is None:
        return False
    if q.operator == "<>":
        return v != q.value
    return OPS[q.operator](v, q.value)


@pytest.mark.parametrize("seed", range(6))
def test_arrow_filter_keeps_every_matching_row(seed: int) -> None:
    """Random qual sets: the pushed filter keeps all rows PostgreSQL wants, and drops rows."""
    rs = make_resource_spans(n=200, seed=seed, spacing_ns=500_000_000)
    info = BlockInfo(P1, P2, P3, at(0))
    table = decode_block(rs.SerializeToString(), info)
    rows = arrow_rows(table)
    rnd = random.Random(seed)
    dropped_total = exact = 0
    for _ in range(60):
        quals = []
        for _ in range(rnd.randrange(1, 4)):
            col = rnd.choice(
                [
                    "start_time",
                    "end_time",
                    "name",
                    "kind",
                    "status",
                    "duration",
                    "parent_span_id",
                    "status_message",
                    "span_id",
                ]
            )
            op = rnd.choice(["=", "<", "<=", ">", ">=", "<>"])
            if col in ("start_time", "end_time"):
                val: object = at(rnd.uniform(-5, 110))
                if op == "=":
                    val = rnd.choice(rows)[col]
            elif col == "duration":
                val = rnd.choice(rows)["duration"] + rnd.choice([-1, 0, 1])
            elif col == "span_id":
                val, op = rnd.choice(rows)["span_id"], "="
            elif col in ("parent_span_id", "status_message"):
                val, op = None, rnd.choice(["=", "<>"])
            else:
                val = rnd.choice(rows)[col]
                if rnd.random() < 0.3:
                    val, op = [val, "nope"], ("=", True)
            quals.append(Qual(col, op, val))
        req = scan_request(quals)
        want = [r for r in rows if all(sql_match(r, q) for q in quals)]
        expr = request_expression(req)
        got = arrow_rows(table.filter(expr)) if expr is not None else rows
        key = operator.itemgetter("span_id")
        assert {key(r) for r in want} <= {key(r) for r in got}, quals
        if len(req.predicates) == len(quals):  # every qual pushed: the filter is exact
            exact += 1
            assert sorted(map(key, got)) == sorted(map(key, want)), quals
        dropped_total += len(rows) - len(got)
    assert dropped_total > 0 and exact > 20


def test_overlap_filter_keeps_spans_crossing_the_edges() -> None:
    """Window [10 s, 20 s] from end_time >= 10 AND start_time <= 20: long spans survive."""
    t = pa.table(
        {
            "start_time": pa.array(
                [at(0), at(5), at(15), at(25), at(12)], pa.timestamp("us", "UTC")
            ),
            "end_time": pa.array(
                [at(9), at(30), at(16), at(26), at(11)], pa.timestamp("us", "UTC")
            ),
            "id": [0, 1, 2, 3, 4],
        }
    )
    req = scan_request([Qual("end_time", ">=", at(10)), Qual("start_time", "<=", at(20))])
    assert req.window == TimeWindow(at(10), at(20))
    from otelspans_fdw.lake.filters import window_expression

    expr = window_expression(req.window)
    assert expr is not None
    # id 4 ends before it starts: kept as the instant 12 s, inside the window
    assert sorted(t.filter(expr).column("id").to_pylist()) == [1, 2, 4]
