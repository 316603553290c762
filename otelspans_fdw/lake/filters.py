"""Translator: a :class:`~otelspans_fdw.quals.ScanRequest` -> a pyarrow dataset expression.

The expression is what the Parquet reader evaluates: against row-group statistics first (a row
group whose ``start_time``/``end_time`` range cannot satisfy it is never read), then row by row.
It only ever removes rows that PostgreSQL would remove too.
"""

from __future__ import annotations

import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from otelspans_fdw.quals import Predicate, ScanRequest, TimeWindow
from otelspans_fdw.schema import column

__all__ = ["predicate_expression", "request_expression", "window_expression"]


def _scalar(col: str, v: Any) -> pa.Scalar:
    t = column(col).arrow_type
    if isinstance(v, uuid.UUID):
        v = v.bytes
    return pa.scalar(v, type=t)


def window_expression(window: TimeWindow) -> pc.Expression | None:
    """The overlap filter ``start_time <= end AND end_time >= begin``.

    A span whose end precedes its start (clock skew) is treated as the instant ``start``, so it
    is kept whenever its ``start_time`` is in the window, as PostgreSQL's own quals would.
    """
    parts = []
    if window.end is not None:
        parts.append(pc.field("start_time") <= _scalar("start_time", window.end))
    if window.begin is not None:
        b = _scalar("end_time", window.begin)
        parts.append((pc.field("end_time") >= b) | (pc.field("start_time") >= b))
    return _and(parts)


def predicate_expression(p: Predicate) -> pc.Expression:
    """One predicate as an expression (SQL semantics: comparisons never match NULL)."""
    f = pc.field(p.column)
    if p.op == "is_null":
        return f.is_null()
    if p.op == "not_null":
        return f.is_valid()
    if p.op == "in":
        t = column(p.column).arrow_type
        vals = [v.bytes if isinstance(v, uuid.UUID) else v for v in p.value]
        return f.isin(pa.array(vals, type=t))
    v = _scalar(p.column, p.value)
    match p.op:
        case "=":
            return f == v
        case "<>":
            return f != v
        case "<":
            return f < v
        case "<=":
            return f <= v
        case ">":
            return f > v
        case ">=":
            return f >= v
    raise AssertionError(f"unknown operator {p.op!r}")


def request_expression(req: ScanRequest) -> pc.Expression | None:
    """Everything pushable of ``req`` (process ids excepted: files are per process)."""
    parts = [window_expression(req.window)]
    parts += [predicate_expression(p) for p in req.predicates]
    return _and([p for p in parts if p is not None])


def _and(parts: list[pc.Expression]) -> pc.Expression | None:
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out = out & p
    return out
