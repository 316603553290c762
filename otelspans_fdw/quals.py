"""Multicorn quals -> a scan request: process ids, a time window, and simple predicates.

This module is the predicate *model* only; translators live elsewhere
(:mod:`otelspans_fdw.lake.filters` turns a request into a pyarrow expression, the wrapper's
``explain`` into text), as pyiceberg keeps expressions apart from their visitors.

Rules (PostgreSQL rechecks every qual, so anything we do not understand is simply not pushed):

* ``process_id``: ``=`` a value, ``IN (...)``/``= ANY(...)``; several such quals intersect.
  ``= NULL`` or ``IS NULL`` can match nothing.
* ``trace_id`` (issue 6): the same forms give ``trace_ids`` (lowercase hex), which lets a scan
  find its processes through the trace index instead of a process qual.  The qual is also kept
  as an ordinary predicate (the Parquet filter).
* ``start_time``/``end_time`` with ``= < <= > >=`` narrow the window ``[begin, end]`` (BETWEEN
  arrives as two quals).  Any row satisfying the quals overlaps the window, so the store is
  scanned with the overlap filter ``start_time <= end AND end_time >= begin``; spans crossing
  the edges survive.  The comparisons themselves are also pushed as exact predicates.
* ``service_name``, ``exe``, ``computer`` (``=``, ``IN``): process attributes, so they name
  processes as ``process_id`` does (``process_attrs``; the lake looks the ids up in
  ``otel_processes``).  They stay ordinary predicates too.
* ``timestamp`` (without time zone) and ``date`` values (what JDBC's ``LocalDateTime`` and a
  date picker send) are windows too: PostgreSQL compares them with ``timestamptz`` in the
  session's ``TimeZone``, so they are read as local times of that zone (``timezone`` argument
  of :func:`scan_request`); a local time that a DST change makes ambiguous or skipped widens
  the window to every instant it may name, and PostgreSQL's recheck keeps the exact rows.
* other columns: equality-type comparisons on text (``=``, ``<>``, lists, ``IS [NOT] NULL``);
  ordering comparisons only where the order is the same in Arrow and PostgreSQL (numbers,
  timestamps; never text, whose order depends on the collation).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from otelspans_fdw.qualvalues import normalise

__all__ = [
    "PROCESS_ATTRS",
    "Op",
    "Predicate",
    "QualLike",
    "ScanRequest",
    "TimeWindow",
    "scan_request",
    "session_zone",
]

Op = Literal["=", "<>", "<", "<=", ">", ">=", "in", "is_null", "not_null"]

_COMPARISONS = frozenset({"=", "<>", "<", "<=", ">", ">="})
_ORDERED = frozenset({"<", "<=", ">", ">="})

# Columns and the Python value types a predicate on them may carry.
_TEXT = (str,)
_TEXT_COLUMNS = frozenset(
    {
        "trace_id",
        "span_id",
        "parent_span_id",
        "name",
        "kind",
        "status",
        "status_message",
        "exe",
        "username",
        "computer",
        "service_name",
    }
)
_INT_COLUMNS = frozenset({"duration"})
_TIME_COLUMNS = frozenset({"start_time", "end_time", "insert_time"})
_UUID_COLUMNS = frozenset({"stream_id", "block_id"})


class QualLike(Protocol):
    """What we read from a Multicorn ``Qual`` (ours or multicorn2's)."""

    field_name: str
    operator: Any
    value: Any


@dataclass(frozen=True, slots=True)
class Predicate:
    """``column op value`` with a value already checked against the column's type."""

    column: str
    op: Op
    value: Any = None

    def __str__(self) -> str:
        if self.op == "is_null":
            return f"{self.column} IS NULL"
        if self.op == "not_null":
            return f"{self.column} IS NOT NULL"
        if self.op == "in":
            return f"{self.column} IN ({', '.join(_lit(v) for v in self.value)})"
        return f"{self.column} {self.op} {_lit(self.value)}"


def _lit(v: Any) -> str:
    if isinstance(v, dt.datetime):
        return f"'{v.isoformat()}'"
    if isinstance(v, str | uuid.UUID):
        return f"'{v}'"
    return str(v)


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """``[begin, end]`` (either side open when None); rows must overlap it."""

    begin: dt.datetime | None = None
    end: dt.datetime | None = None

    @property
    def is_empty(self) -> bool:
        return self.begin is not None and self.end is not None and self.begin > self.end

    def narrow(
        self, begin: dt.datetime | None = None, end: dt.datetime | None = None
    ) -> TimeWindow:
        """The intersection with ``[begin, end]``."""
        b = self.begin if begin is None or (self.begin and self.begin >= begin) else begin
        e = self.end if end is None or (self.end and self.end <= end) else end
        return TimeWindow(b, e)

    def __str__(self) -> str:
        b = self.begin.isoformat() if self.begin else "-infinity"
        e = self.end.isoformat() if self.end else "infinity"
        return f"[{b}, {e}]"


@dataclass(frozen=True, slots=True)
class ScanRequest:
    """What a scan must return, as far as the quals say.

    ``process_ids`` is None when no qual names the process; ``trace_ids`` likewise for the
    trace (lowercase, as stored).  A scan needs one of them or a bounded window (the wrapper
    refuses the others).  An empty set means no row can match.
    """

    process_ids: frozenset[uuid.UUID] | None = None
    trace_ids: frozenset[str] | None = None
    window: TimeWindow = field(default_factory=TimeWindow)
    predicates: tuple[Predicate, ...] = ()
    matches_nothing: bool = False
    #: (column, values) of process attributes given by = or IN: they select processes
    process_attrs: tuple[tuple[str, frozenset[str]], ...] = ()

    @property
    def is_empty(self) -> bool:
        return (
            self.matches_nothing
            or self.window.is_empty
            or self.process_ids == frozenset()
            or self.trace_ids == frozenset()
            or any(not vals for _, vals in self.process_attrs)
        )


def _as_uuid(v: Any) -> uuid.UUID | None:
    if isinstance(v, uuid.UUID):
        return v
    if isinstance(v, str):
        try:
            return uuid.UUID(v)
        except ValueError:
            return None
    return None


def _aware(v: Any) -> dt.datetime | None:
    if isinstance(v, dt.datetime) and v.tzinfo is not None:
        return v
    return None


def _instants(v: Any, tz: Any) -> tuple[dt.datetime, dt.datetime] | None:
    """The earliest and latest instant a time value may name (equal unless it is a local time
    that a DST change makes ambiguous or skipped); None when it is not a time or no zone is
    known for a local one."""
    t = _aware(v)
    if t is not None:
        return t, t
    if tz is None:
        return None
    if isinstance(v, dt.date) and not isinstance(v, dt.datetime):
        v = dt.datetime(v.year, v.month, v.day)
    if not isinstance(v, dt.datetime):
        return None
    try:
        folds = [v.replace(tzinfo=tz, fold=f).astimezone(dt.UTC) for f in (0, 1)]
        return min(folds) - _DST_SLACK, max(folds) + _DST_SLACK
    except (OverflowError, ValueError):
        return None  # beyond datetime's range: PostgreSQL alone compares it


#: Widening of a local time's instants: a skipped local time (spring forward) maps to either
#: side of the gap, which zoneinfo's folds give only up to the gap's length (at most 2 h).
_DST_SLACK = dt.timedelta(hours=2)


def session_zone(name: str | None) -> Any:
    """The ``zoneinfo`` zone of a PostgreSQL ``TimeZone`` setting, or None if unknown."""
    if not name:
        return None
    import zoneinfo

    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return None


def _value_ok(column: str, v: Any) -> bool:
    if column in _TEXT_COLUMNS:
        return isinstance(v, _TEXT)
    if column in _INT_COLUMNS:
        return isinstance(v, int) and not isinstance(v, bool)
    if column in _TIME_COLUMNS:
        return _aware(v) is not None
    if column in _UUID_COLUMNS:
        return isinstance(v, uuid.UUID)
    return False


def _op_of(q: QualLike) -> tuple[str, bool | None]:
    op = q.operator
    if isinstance(op, tuple):
        return str(op[0]), bool(op[1])
    return str(op), None


def _predicate(q: QualLike) -> Predicate | None:
    """The pushable predicate of a non-process qual, or None."""
    col = q.field_name
    op, any_all = _op_of(q)
    v = q.value
    if col not in _TEXT_COLUMNS | _INT_COLUMNS | _TIME_COLUMNS | _UUID_COLUMNS:
        return None
    if v is None and any_all is None:
        if op == "=":
            return Predicate(col, "is_null")
        if op == "<>":
            return Predicate(col, "not_null")
        return None
    if any_all is not None:
        if op == "=" and any_all and isinstance(v, list | tuple):
            vals = tuple(x for x in v if x is not None)
            if all(_value_ok(col, x) for x in vals):
                return Predicate(col, "in", vals)
        return None
    if op not in _COMPARISONS or not _value_ok(col, v):
        return None
    if op in _ORDERED and col in _TEXT_COLUMNS:
        return None  # text order depends on the collation: leave it to PostgreSQL
    return Predicate(col, op, v)  # type: ignore[arg-type]


def _narrow_window(
    window: TimeWindow, col: str, op: str, v: tuple[dt.datetime, dt.datetime]
) -> TimeWindow:
    """Apply ``col op v`` (col is start_time or end_time; ``v`` the earliest and latest
    instant the value may name) to the window."""
    lo, hi = v
    if op in (">", ">="):
        return window.narrow(begin=lo)
    if op in ("<", "<="):
        return window.narrow(end=hi)
    if op == "=":
        return window.narrow(begin=lo, end=hi)
    return window


def scan_request(quals: Iterable[QualLike], *, timezone: Any = None) -> ScanRequest:
    """Translate the quals the host offers into a :class:`ScanRequest`; ``timezone`` (a
    ``tzinfo``, see :func:`session_zone`) reads ``timestamp`` and ``date`` values."""
    quals = normalise(quals)
    pids: frozenset[uuid.UUID] | None = None
    tids: frozenset[str] | None = None
    window = TimeWindow()
    preds: list[Predicate] = []
    attrs: dict[str, frozenset[str]] = {}
    nothing = False
    for q in quals:
        col = q.field_name
        op, any_all = _op_of(q)
        if col == "process_id":
            if op != "=" or any_all is False:
                continue
            if any_all:
                vals = q.value if isinstance(q.value, list | tuple) else []
                ids = frozenset(u for u in map(_as_uuid, vals) if u is not None)
            else:
                u = _as_uuid(q.value)
                ids = frozenset([u]) if u is not None else frozenset()
            pids = ids if pids is None else pids & ids
            continue
        if col == "trace_id" and op == "=" and any_all is not False:
            found = _trace_ids(q.value, any_all)
            tids = found if tids is None else tids & found
        if col in ("start_time", "end_time") and any_all is None:
            t = _instants(q.value, timezone)
            if t is not None:
                window = _narrow_window(window, col, op, t)
            elif q.value is None and op in _COMPARISONS:
                nothing = True  # start_time/end_time are NOT NULL; comparing with NULL: no row
        elif col in ("start_time", "end_time") and any_all and op == "=":
            spans = [t for t in (_instants(x, timezone) for x in q.value or []) if t is not None]
            if spans and len(spans) == len(q.value):
                window = window.narrow(begin=min(t[0] for t in spans), end=max(t[1] for t in spans))
        p = _predicate(q)
        if p is not None:
            preds.append(p)
            if col in PROCESS_ATTRS and p.op in ("=", "in"):
                vals = frozenset(p.value if p.op == "in" else (p.value,))
                attrs[col] = vals if col not in attrs else attrs[col] & vals
    return ScanRequest(pids, tids, window, tuple(preds), nothing, tuple(sorted(attrs.items())))


#: Process attributes (columns of ``otel_processes``) whose = / IN quals select processes.
PROCESS_ATTRS = ("service_name", "exe", "computer")


def _trace_ids(value: Any, any_all: bool | None) -> frozenset[str]:
    """The trace ids of an ``=``/``IN`` qual, as stored (lowercase); NULLs match nothing.

    The value is lowercased only to find blocks; PostgreSQL rechecks the qual as written, so
    an uppercase literal finds its blocks and then, rightly, no row (text ``=`` is exact).
    """
    vals = (value if isinstance(value, list | tuple) else []) if any_all else [value]
    return frozenset(v.lower() for v in vals if isinstance(v, str))
