"""``otelspans materialise``: build stale partitions ahead of the queries.

One pass by default (with a progress display on the terminal, one line per few seconds when
the output is not a terminal, and a JSON summary at the end); ``--follow`` keeps going, a few
seconds behind ingestion, with its CPU share capped, until SIGINT or SIGTERM.  The work and
its locks are those of a scan's just-in-time refresh (:mod:`otelspans_fdw.lake.materialise`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any, TextIO

__all__ = ["add_materialise", "cmd_materialise"]


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a fraction of one core, 0 < f <= 1")
    return v


def _seconds(text: str) -> float:
    from otelspans_fdw.lake.retention import parse_duration

    try:
        secs = parse_duration(text).total_seconds()
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if secs <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return secs


def add_materialise(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "materialise",
        aliases=["materialize"],
        help="build the stale partitions now (--follow: keep them a few seconds behind)",
        description="Builds every partition that does not cover exactly the blocks of its "
        "hour, with the same per-partition locks as scans and retention (a partition is never "
        "built twice). Queries stay exact without it: they build what is still stale.",
    )
    p.add_argument("--dsn", default=None, help="metadata DSN (default $OTELSPANS_DSN or PG* vars)")
    p.add_argument(
        "--store",
        default=None,
        help="object store (default $OTELSPANS_STORE, else the receiver's recorded store)",
    )
    p.add_argument("--follow", action="store_true", help="keep going until SIGINT/SIGTERM")
    p.add_argument(
        "--interval",
        type=_seconds,
        default=2.0,
        metavar="DURATION",
        help="with --follow: pause between passes (default 2s)",
    )
    p.add_argument(
        "--lookback",
        type=_seconds,
        default=7200.0,
        metavar="DURATION",
        help="with --follow: hours looked at after the first full pass (default 2h)",
    )
    p.add_argument(
        "--max-cpu",
        type=_fraction,
        default=None,
        metavar="FRACTION",
        help="share of one core spent building (default 1 for a pass, 0.5 with --follow)",
    )
    p.set_defaults(func=cmd_materialise)


class _Progress:
    """``[12/340] 1,234 blocks 56,789 rows 3.4 s``: rewritten in place on a terminal, a line
    every ``every`` seconds otherwise (logs stay readable)."""

    def __init__(self, out: TextIO, every: float = 5.0):
        self.out, self.tty, self.every = out, out.isatty(), every
        self.t0 = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: int, rs: Any) -> None:
        now = time.monotonic()
        if not self.tty and done < total and now - self.last < self.every:
            return
        self.last = now
        line = (
            f"[{done}/{total}] partitions, {rs.blocks_decoded:,} blocks,"
            f" {rs.rows_written:,} rows, {now - self.t0:.1f} s"
        )
        if self.tty:
            self.out.write("\r" + line + ("\n" if done == total else ""))
        else:
            self.out.write(line + "\n")
        self.out.flush()


def cmd_materialise(args: argparse.Namespace) -> int:
    import datetime as dt

    from otelspans_fdw import db
    from otelspans_fdw.lake import materialise
    from otelspans_fdw.lake.partitions import ensure_schema
    from otelspans_fdw.objstore import open_store

    dsn = args.dsn if args.dsn is not None else db.default_dsn()
    stopping: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    with db.connect(dsn, autocommit=True) as conn:
        db.migrate(conn)
        ensure_schema(conn)
        url = (
            args.store
            or os.environ.get("OTELSPANS_STORE")
            or db.setting(conn, db.STORE_URL_SETTING)
        )
        store = open_store(url)

        def warn(msg: str) -> None:
            print(msg, file=sys.stderr)

        if not args.follow:
            st = materialise.run_pass(
                conn,
                store,
                progress=_Progress(sys.stderr),
                warn=warn,
                max_cpu=args.max_cpu or 1.0,
                stop=lambda: bool(stopping),
            )
            print(json.dumps({k: getattr(st, k) for k in st.__slots__}))  # type: ignore[attr-defined]
            return 130 if stopping else 0
        for st in materialise.follow(
            conn,
            store,
            interval=args.interval,
            lookback=dt.timedelta(seconds=args.lookback),
            max_cpu=args.max_cpu or 0.5,
            warn=warn,
            stop=lambda: bool(stopping),
        ):
            if st.built or st.blocks_failed:
                print(
                    json.dumps({k: getattr(st, k) for k in st.__slots__}),  # type: ignore[attr-defined]
                    flush=True,
                )
    return 0
