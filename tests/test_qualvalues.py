"""Qual values in either host's form read as one (the otel_spans wrapper under multicorn2).

The pure part runs here: multicorn2 hands timestamptz, uuid and int8 values as their output
text.  The session-dependent part (a ``timestamp`` compared with a timestamptz column is local
time of the session's TimeZone) runs in a real backend of our host, through SQL.  The same
queries under a real multicorn2 are in compat/ (scripts/check-multicorn2.sh).
"""

from __future__ import annotations

import datetime as dt
import uuid

from spans_helpers import T0_NS, ns_to_dt, overlapping
from test_otel_spans_sql import SpansDB, ingest_processes, sdb  # noqa: F401  (fixture)

from otelspans_fdw.quals import scan_request
from otelspans_fdw.qualvalues import NormalQual, normalise

U = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8")


def test_text_values_are_read_as_the_column_type() -> None:
    got = normalise(
        [
            NormalQual("process_id", "=", str(U)),
            NormalQual("block_id", ("=", True), [str(U), None]),
            NormalQual("start_time", ">=", "2023-11-14 22:13:30.25+00"),
            NormalQual("end_time", "<=", "2023-11-15 01:00:00+05:30"),
            NormalQual("duration", ">", "5000000000"),
            NormalQual("duration", "<", 2.0),
            NormalQual("name", "=", "GET /"),
        ]
    )
    assert got == [
        NormalQual("process_id", "=", U),
        NormalQual("block_id", ("=", True), [U, None]),
        NormalQual("start_time", ">=", dt.datetime(2023, 11, 14, 22, 13, 30, 250000, dt.UTC)),
        NormalQual("end_time", "<=", dt.datetime(2023, 11, 14, 19, 30, tzinfo=dt.UTC).astimezone()),
        NormalQual("duration", ">", 5_000_000_000),
        NormalQual("duration", "<", 2),
        NormalQual("name", "=", "GET /"),
    ]
    req = scan_request(
        [
            NormalQual("process_id", "=", str(U)),
            NormalQual("start_time", ">=", "2023-11-14 22:13:30+00"),
        ]
    )
    assert req.process_ids == frozenset([U])
    assert str(req.window) == "[2023-11-14T22:13:30+00:00, infinity]"


def test_unreadable_values_leave_the_qual_out() -> None:
    """An infinity is no bound; a value in another DateStyle, a malformed uuid or a fractional
    number for bigint are not pushed:
    PostgreSQL rechecks every qual, so leaving one out is always correct."""
    got = normalise(
        [
            NormalQual("start_time", ">=", "-infinity"),
            NormalQual("start_time", ">=", "Tue Nov 14 22:13:30 2023 UTC"),
            NormalQual("process_id", "=", "not-a-uuid"),
            NormalQual("duration", ">", 1.5),
        ]
    )
    assert got == []
    # A timestamp under multicorn2 is known to the second: widened to keep every row, left
    # naive for scan_request to read in the session's zone.
    t = dt.datetime(2023, 11, 14, 22, 13)
    assert normalise(
        [
            NormalQual("start_time", ">=", t),
            NormalQual("end_time", "<", t),
            NormalQual("end_time", "=", t),
            NormalQual("start_time", ("=", True), [t]),
        ]
    ) == [
        NormalQual("start_time", ">=", t),
        NormalQual("end_time", "<=", t + dt.timedelta(microseconds=999_999)),
        NormalQual("end_time", ">=", t),
        NormalQual("end_time", "<=", t + dt.timedelta(microseconds=999_999)),
    ]
    assert scan_request([NormalQual("start_time", ">=", "Tue Nov 14 22:13:30 2023 UTC")]) == (
        scan_request([])
    )


def test_timestamp_without_time_zone_is_session_local_time(sdb: SpansDB) -> None:  # noqa: F811
    pids = ingest_processes(sdb)
    rows = sdb.ing.expected(pids)
    begin = ns_to_dt(T0_NS) + dt.timedelta(seconds=12, microseconds=500)
    end = begin + dt.timedelta(seconds=9)
    want = overlapping(rows, begin, end)
    assert want
    for zone in ("UTC", "Asia/Kolkata", "America/New_York"):
        sdb.conn.execute(f"SET TimeZone = '{zone}'")
        tz = dt.UTC if zone == "UTC" else __import__("zoneinfo").ZoneInfo(zone)
        b = begin.astimezone(tz).replace(tzinfo=None).isoformat(sep=" ")
        e = end.astimezone(tz).replace(tzinfo=None).isoformat(sep=" ")
        # No process: only a window read as local time gives a bounded scan (quals.py).
        got = sdb.spans(
            f"SELECT * FROM otel_spans WHERE end_time >= '{b}'::timestamp"
            f" AND start_time <= '{e}'::timestamp"
        )
        assert got == want, zone
