"""Qual values as our host hands them, whichever host ran the wrapper.

Our host converts a qual's value to the Python type of its SQL type (aware ``datetime`` with
microseconds for timestamptz, ``uuid.UUID``, ``int`` for every integer width).  multicorn2 3.2
converts only text, int4, date, timestamp, numeric, bytea and arrays of those; every other type
arrives as the text of its output function, so a timestamptz is ``'2023-11-14 22:13:30.25+00'``
(in the session's DateStyle), a uuid a ``str``, an int8 literal past int4 ``'5000000000'``.
A ``timestamp without time zone`` arrives as a naive ``datetime`` truncated to the second (on
our host: with its microseconds); it stays naive here, and :func:`otelspans_fdw.quals.scan_request`
reads it in the session's ``TimeZone`` (:func:`session_timezone` under multicorn2).

:func:`normalise` reads each value back as the column's type, so the rest of the wrapper sees
one form.  Where a host's value is less precise than the SQL value (a timestamp truncated to
the second), the qual is widened so that it still holds for every row the exact qual holds
for: PostgreSQL rechecks every qual, so a wider pushed qual reads a little more and is never
wrong, while a narrower one would lose rows.  A value that cannot be read (a DateStyle other
than ISO) leaves the qual out, as if it had not been offered.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import decimal
import functools
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from otelspans_fdw.schema import COLUMNS

__all__ = ["NormalQual", "normalise", "session_timezone"]

_SQL_TYPES = {c.name: c.sql_type for c in COLUMNS}
_SECOND = dt.timedelta(seconds=1)
_MICRO = dt.timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class NormalQual:
    """A qual with its value in our host's form (the shape of a Multicorn ``Qual``)."""

    field_name: str
    operator: Any
    value: Any


class _Unreadable(Exception):
    """The value cannot be read as the column's type: leave the qual out."""


@functools.cache
def _our_host() -> bool:
    try:
        import _otelspans_host  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _postgres_symbols() -> Any:
    """The backend's own symbols (we run inside a PostgreSQL backend under multicorn2)."""
    return ctypes.CDLL(None)


def _setting(name: str) -> str | None:
    """A setting of *this session* (``TimeZone``) under multicorn2.

    Nothing in the Multicorn2 API gives a wrapper the session's settings, and a separate
    connection would see the server's defaults, not a ``SET`` of this session.  PostgreSQL's
    ``GetConfigOption(name, missing_ok, restrict_privileged)`` reads the value without side
    effects and never raises for a setting that exists.
    """
    try:
        fn = _postgres_symbols().GetConfigOption
    except (AttributeError, OSError):
        return None
    fn.restype = ctypes.c_char_p
    fn.argtypes = [ctypes.c_char_p, ctypes.c_bool, ctypes.c_bool]
    raw = fn(name.encode(), True, False)
    return raw.decode() if raw else None


def session_timezone() -> str | None:
    """This session's ``TimeZone`` under multicorn2 (our host reports it itself)."""
    return _setting("TimeZone")


def _timestamptz_text(v: str) -> dt.datetime | None:
    """timestamptz output text in DateStyle ISO; None for the infinities (no bound)."""
    if v in ("infinity", "-infinity"):
        return None
    try:
        t = dt.datetime.fromisoformat(v)
    except ValueError as e:
        raise _Unreadable(v) from e
    if t.tzinfo is None:
        raise _Unreadable(v)
    return t


def _as_uuid(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return uuid.UUID(v)
        except ValueError as e:
            raise _Unreadable(v) from e
    return v


def _as_int(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError as e:
            raise _Unreadable(v) from e
    if isinstance(v, float | decimal.Decimal):
        if v != v or v in (float("inf"), float("-inf")) or v != int(v):
            raise _Unreadable(str(v))
        return int(v)
    return v


def _element(sql_type: str, v: Any) -> Any:
    """One value as our host gives it; naive datetimes are handled by the caller."""
    if v is None:
        return None
    if sql_type == "uuid":
        return _as_uuid(v)
    if sql_type == "bigint":
        return _as_int(v)
    if sql_type == "timestamptz" and isinstance(v, str):
        return _timestamptz_text(v)
    return v


def _widened(col: str, op: str, t: dt.datetime) -> list[NormalQual]:
    """``col op t`` for a time ``t`` known only to the second: the exact value is in
    ``[t, t + 1s)``, so bound each side by the end of that second that keeps every row."""
    last = t + _SECOND - _MICRO
    if op in (">", ">="):
        return [NormalQual(col, op, t)]
    if op in ("<", "<="):
        return [NormalQual(col, "<=", last)]
    if op == "=":
        return [NormalQual(col, ">=", t), NormalQual(col, "<=", last)]
    return []


def _naive(v: Any) -> bool:
    if isinstance(v, list | tuple):
        return any(_naive(x) for x in v)
    return isinstance(v, dt.datetime) and v.tzinfo is None


def _one(q: Any) -> list[NormalQual]:
    col, op, v = q.field_name, q.operator, q.value
    sql_type = _SQL_TYPES.get(col)
    if sql_type is None:
        return [NormalQual(col, op, v)]
    if sql_type == "timestamptz" and _naive(v) and not _our_host():
        # multicorn2 drops the microseconds of a timestamp; the zone is applied later, as on
        # our host (quals.scan_request's timezone).
        if isinstance(op, tuple):
            raise _Unreadable("list of timestamps known to the second")
        return _widened(col, op, v)
    if isinstance(v, str) and sql_type == "timestamptz":
        t = _timestamptz_text(v)
        return [NormalQual(col, op, t)] if t is not None else []
    if isinstance(op, tuple) and isinstance(v, list | tuple):
        return [NormalQual(col, op, [_element(sql_type, x) for x in v])]
    return [NormalQual(col, op, _element(sql_type, v))]


def normalise(quals: Iterable[Any]) -> list[NormalQual]:
    """The quals with values in our host's form, widened where the host lost precision."""
    out: list[NormalQual] = []
    for q in quals:
        try:
            out += _one(q)
        except _Unreadable:
            continue
    return out
