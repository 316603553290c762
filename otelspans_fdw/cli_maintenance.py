"""``otelspans retention`` and ``otelspans publish``: maintenance subcommands of the CLI.

Kept apart from :mod:`otelspans_fdw.cli` (which lists ``add_retention`` and ``add_publish`` in
its ``SUBCOMMANDS``) so that operations code does not grow the receiver's dispatcher.  Both
print their counts as one JSON object, for scripts and cron mails alike.  The store comes from
``--store``, else ``OTELSPANS_STORE``, else the store the receiver recorded (S3 credentials
from the ``AWS_*`` variables); the SQL functions
``otel_retention`` / ``otel_publish`` do the same work from inside PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from otelspans_fdw.exceptions import ConfigurationError
from otelspans_fdw.objstore import ObjectStore

__all__ = ["add_publish", "add_retention", "cmd_publish", "cmd_retention"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dsn", default=None, help="metadata DSN (default $OTELSPANS_DSN or PG* vars)")
    p.add_argument(
        "--store",
        default=None,
        help="object store: directory or s3://bucket/prefix (default $OTELSPANS_STORE, "
        "else the store the receiver recorded); S3 credentials from the AWS_* variables",
    )


def _duration(text: str) -> float:
    from otelspans_fdw.lake.retention import parse_duration

    try:
        return parse_duration(text).total_seconds()
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_retention(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retention",
        help="remove blocks, payloads, partitions and files inserted before a cut",
        description="Removes everything inserted before the start of the UTC hour holding "
        "now - OLDER_THAN (whole partitions), in batches of one transaction each; safe while "
        "the receiver and queries run.",
    )
    _common(p)
    p.add_argument(
        "--older-than",
        required=True,
        type=_duration,
        metavar="DURATION",
        help="age of the cut: 30m, 12h, 7d, 2w",
    )
    p.add_argument("--batch-size", type=int, default=1000, help="blocks per transaction")
    p.add_argument(
        "--grace",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="retired partition files are deleted once this old (default 10m: running "
        "scans may still read them)",
    )
    p.set_defaults(func=cmd_retention)


def cmd_retention(args: argparse.Namespace) -> int:
    import datetime as dt

    from otelspans_fdw import db
    from otelspans_fdw.lake import refresh, retention

    dsn = args.dsn if args.dsn is not None else db.default_dsn()
    with db.connect(dsn, autocommit=True) as conn:
        store = _recorded_store(conn, args.store)
        stats = retention.run(
            conn,
            dsn,
            store,
            dt.timedelta(seconds=args.older_than),
            batch_size=args.batch_size,
            grace_seconds=refresh.DEFAULT_GRACE_SECONDS if args.grace is None else args.grace,
        )
    print(json.dumps(stats.as_dict()))
    return 0


def add_publish(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "publish",
        help="register new partition files in the Iceberg table (and drop removed ones)",
    )
    _common(p)
    p.add_argument(
        "--batch",
        type=int,
        default=int(os.environ.get("OTELSPANS_PUBLISH_BATCH", "500")),
        help="files per Iceberg snapshot",
    )
    p.add_argument(
        "--max-stale-spans",
        type=int,
        default=int(os.environ.get("OTELSPANS_MAX_STALE_SPANS", "2000000")),
        help="most spans to materialise before publishing (default 2000000)",
    )
    p.set_defaults(func=cmd_publish)


def _recorded_store(conn: Any, given: str | None) -> ObjectStore:
    """``--store``, else ``OTELSPANS_STORE``, else the store the receiver recorded in the
    metadata database: never a made-up default, which would publish or delete nothing."""
    from otelspans_fdw import db
    from otelspans_fdw.objstore import open_store

    url = given or os.environ.get("OTELSPANS_STORE") or db.setting(conn, db.STORE_URL_SETTING)
    if not url:
        raise ConfigurationError(
            "no object store: the metadata database records none",
            hint="Give --store (a directory or s3://bucket/prefix), or set OTELSPANS_STORE; a "
            "receiver records its store when it starts.",
        )
    return open_store(url)


def cmd_publish(args: argparse.Namespace) -> int:
    from otelspans_fdw import db
    from otelspans_fdw.lake import publish
    from otelspans_fdw.objstore import file_mode, shared_files

    dsn = args.dsn if args.dsn is not None else db.default_dsn()
    with db.connect(dsn, autocommit=True) as conn:
        db.require_current(conn)
        store = _recorded_store(conn, args.store)
        with file_mode(shared_files()):
            stats = publish.publish(
                conn, dsn, store, batch=args.batch, max_stale_spans=args.max_stale_spans
            )
    print(json.dumps(stats.as_dict()))
    return 0
