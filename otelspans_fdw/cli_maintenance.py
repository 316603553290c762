"""``otelspans retention`` and ``otelspans publish``: maintenance subcommands of the CLI.

Kept apart from :mod:`otelspans_fdw.cli` (which lists ``add_retention`` and ``add_publish`` in
its ``SUBCOMMANDS``) so that operations code does not grow the receiver's dispatcher.  Both
print their counts as one JSON object, for scripts and cron mails alike.  The store comes from
``--store`` (S3 credentials from the ``AWS_*`` variables); the SQL functions
``otel_retention`` / ``otel_publish`` do the same work from inside PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import os

__all__ = ["add_publish", "add_retention", "cmd_publish", "cmd_retention"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dsn", default=None, help="metadata DSN (default $OTELSPANS_DSN or PG* vars)")
    p.add_argument(
        "--store",
        default=None,
        help="object store: directory or s3://bucket/prefix (default $OTELSPANS_STORE "
        "or ./otelspans-data); S3 credentials from the AWS_* variables",
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
    from otelspans_fdw.objstore import open_store

    dsn = args.dsn if args.dsn is not None else db.default_dsn()
    store = open_store(args.store)
    with db.connect(dsn, autocommit=True) as conn:
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
    p.set_defaults(func=cmd_publish)


def cmd_publish(args: argparse.Namespace) -> int:
    from otelspans_fdw import db
    from otelspans_fdw.lake import publish
    from otelspans_fdw.lake.partitions import ensure_schema
    from otelspans_fdw.objstore import open_store

    dsn = args.dsn if args.dsn is not None else db.default_dsn()
    store = open_store(args.store)
    with db.connect(dsn, autocommit=True) as conn:
        db.migrate(conn)
        ensure_schema(conn)
        stats = publish.publish(conn, dsn, store, batch=args.batch)
    print(
        json.dumps({"added": stats.added, "removed": stats.removed, "snapshots": stats.snapshots})
    )
    return 0
