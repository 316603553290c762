"""Row-group selection from cached footers (lake/footers.py) on real multi-row-group files."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import pyarrow.compute as pc
from spans_helpers import T0_NS, arrow_rows, make_resource_spans, ns_to_dt, row_key

from otelspans_fdw.lake import footers, parquet
from otelspans_fdw.lake.decode import BlockInfo, decode_block
from otelspans_fdw.lake.filters import window_expression
from otelspans_fdw.objstore import LocalStore
from otelspans_fdw.quals import TimeWindow

HOUR = dt.datetime(2024, 1, 1, 10, tzinfo=dt.UTC)


def _file(store: LocalStore, seed: int) -> tuple[str, list[dict]]:
    rs = make_resource_spans(n=20_000, spacing_ns=1_000_000, seed=seed, fancy=False)
    info = BlockInfo(uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), HOUR, service_name="svc")
    table = decode_block(rs.SerializeToString(), info)
    written = parquet.write_file(store, info.process_id, HOUR, table)
    assert written.nb_row_groups == 3
    return written.path, arrow_rows(table)


def test_selected_row_groups_hold_exactly_the_window_rows(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, durable=False)
    (p1, rows1), (p2, rows2) = _file(store, 1), _file(store, 2)
    cache = footers.FooterCache()
    t0 = ns_to_dt(T0_NS)
    for begin_s, end_s, want_groups in [(1.0, 1.5, 2), (9.0, 9.01, 2), (0.0, 19.0, 6)]:
        w = TimeWindow(t0 + dt.timedelta(seconds=begin_s), t0 + dt.timedelta(seconds=end_s))
        sel = footers.select_row_groups(cache, store, [p1, p2], w)
        assert (sel.row_groups_read, sel.row_groups_total) == (want_groups, 6), w
        got = arrow_rows(
            footers.open_selected(store, sel, ["span_id", "start_time"], window_expression(w))
            .read_all()
            .sort_by("start_time")
        )
        want = [
            {"span_id": r["span_id"], "start_time": r["start_time"]}
            for r in rows1 + rows2
            if r["start_time"] <= w.end and (r["end_time"] >= w.begin or r["start_time"] >= w.begin)
        ]
        key = lambda r: (r["start_time"], r["span_id"])  # noqa: E731
        assert sorted(got, key=key) == sorted(want, key=key) and want, w
    # A window before everything selects nothing and reads nothing.
    early = TimeWindow(t0 - dt.timedelta(hours=2), t0 - dt.timedelta(hours=1))
    sel = footers.select_row_groups(cache, store, [p1, p2], early)
    assert sel.fragments == [] and sel.row_groups_read == 0
    assert footers.open_selected(store, sel, ["span_id"], None).read_all().num_rows == 0


def test_every_column_matches_a_full_read(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, durable=False)
    path, rows = _file(store, 3)
    w = TimeWindow(ns_to_dt(T0_NS + 12 * 10**9), ns_to_dt(T0_NS + 12 * 10**9 + 10**6))
    sel = footers.select_row_groups(footers.FooterCache(), store, [path], w)
    cols = [f.name for f in parquet.READ_SCHEMA]
    table = footers.open_selected(store, sel, cols, window_expression(w)).read_all()
    got = arrow_rows(table.cast(parquet.arrow_schema()))
    want = [r for r in rows if r["start_time"] <= w.end and r["end_time"] >= w.begin]
    assert sorted(got, key=row_key) == sorted(want, key=row_key) and len(want) >= 1
    assert pc.all(pc.equal(table.column("service_name"), "svc")).as_py()


def test_cache_is_bounded_and_least_recently_used(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, durable=False)
    paths = [_file(store, s)[0] for s in (4, 5, 6)]
    one = footers.FooterCache().get(store, paths[0]).nbytes
    cache = footers.FooterCache(max_bytes=2 * one + one // 2)
    for p in paths:
        cache.get(store, p)
    assert len(cache) == 2
    first = cache.get(store, paths[1])
    assert cache.get(store, paths[1]) is first  # cached: the same parsed footer
