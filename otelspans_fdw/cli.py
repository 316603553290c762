"""The ``otelspans`` command: a thin dispatcher, one ``cmd_<name>`` function per subcommand.

To add a subcommand, write ``add_<name>(subparsers)`` that registers its arguments and sets
``func=cmd_<name>``, and list it in :data:`SUBCOMMANDS`.  Heavy imports stay inside the command
functions so that ``otelspans --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from otelspans_fdw.cli_maintenance import add_publish, add_retention
from otelspans_fdw.cli_materialise import add_materialise
from otelspans_fdw.exceptions import OtelSpansError

__all__ = ["main"]


def _common_db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dsn", default=None, help="metadata DSN (default $OTELSPANS_DSN or PG* vars)")


def _common_store(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        default=None,
        help="object store: directory or s3://bucket/prefix (default $OTELSPANS_STORE "
        "or ./otelspans-data)",
    )


# --- serve -------------------------------------------------------------------------------------


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the OTLP receiver (HTTP 4318, gRPC 4317)")
    _common_db(p)
    _common_store(p)
    p.add_argument("--host", default=os.environ.get("OTELSPANS_HOST", "127.0.0.1"))
    p.add_argument(
        "--http-port", type=int, default=int(os.environ.get("OTELSPANS_HTTP_PORT", "4318"))
    )
    p.add_argument(
        "--grpc-port",
        type=int,
        default=int(os.environ.get("OTELSPANS_GRPC_PORT", "4317")),
        help="gRPC port (-1 disables gRPC; 0 picks a free port)",
    )
    p.add_argument("--max-body", type=int, default=20 * 1024 * 1024, help="bytes, after gunzip")
    p.add_argument("--max-inflight", type=int, default=64, help="concurrent requests")
    p.add_argument("--max-inflight-bytes", type=int, default=256 * 1024 * 1024)
    p.add_argument(
        "--header-timeout",
        type=float,
        default=30.0,
        help="seconds for a request's headers, and for an idle connection (default 30)",
    )
    p.add_argument(
        "--body-timeout", type=float, default=60.0, help="seconds for a request body (default 60)"
    )
    p.add_argument(
        "--token",
        default=os.environ.get("OTELSPANS_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' (default $OTELSPANS_TOKEN)",
    )
    p.add_argument(
        "--no-fsync",
        action="store_true",
        help="do not fsync local payload files (survives a receiver crash, not an OS crash)",
    )
    p.add_argument("--no-migrate", action="store_true", help="do not apply metadata migrations")
    p.add_argument(
        "--no-trace-index",
        action="store_true",
        default=os.environ.get("OTELSPANS_TRACE_INDEX", "").strip().lower()
        in ("0", "off", "false", "no"),
        help="do not write otel_trace_blocks (trace_id lookups across processes will miss "
        "these spans; for measuring the index's cost; default $OTELSPANS_TRACE_INDEX=off)",
    )
    p.add_argument(
        "--commit-lanes",
        type=int,
        default=int(os.environ.get("OTELSPANS_COMMIT_LANES", "2")),
        help="metadata transactions written concurrently by the group commit (default 2)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("OTELSPANS_METRICS_PORT", "-1")),
        help="also serve GET /metrics on this port (-1: only on the HTTP port; 0: a free port)",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from otelspans_fdw import db
    from otelspans_fdw.ingest.pipeline import Limits
    from otelspans_fdw.ingest.server import ReceiverConfig, serve

    config = ReceiverConfig(
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        dsn=db.default_dsn() if args.dsn is None else args.dsn,
        store_url=args.store,
        durable=not args.no_fsync,
        token=args.token or None,
        limits=Limits(
            max_body=args.max_body,
            max_inflight_requests=args.max_inflight,
            max_inflight_bytes=args.max_inflight_bytes,
            header_timeout=args.header_timeout,
            body_timeout=args.body_timeout,
        ),
        migrate=not args.no_migrate,
        trace_index=not args.no_trace_index,
        metrics_port=args.metrics_port,
        commit_lanes=args.commit_lanes,
    )
    serve(config)
    return 0


# --- ingest ------------------------------------------------------------------------------------


def add_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="store OTLP request files (protobuf or JSON, maybe gzip)")
    _common_db(p)
    _common_store(p)
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.set_defaults(func=cmd_ingest)


def cmd_ingest(args: argparse.Namespace) -> int:
    from otelspans_fdw import db
    from otelspans_fdw.ingest.files import ingest_file
    from otelspans_fdw.objstore import open_store

    store = open_store(args.store)
    failed = 0
    with db.connect(args.dsn) as conn:
        db.migrate(conn)
        db.record_setting(conn, db.STORE_URL_SETTING, store.url)
        for path in args.files:
            try:
                r = ingest_file(path, store, conn)
            except (OSError, OtelSpansError) as e:
                print(f"{path}: {e}", file=sys.stderr)
                failed += 1
                continue
            print(f"{path}: {r.blocks} block(s), {r.spans} span(s), {r.rejected} rejected")
    return 1 if failed else 0


# --- generate ----------------------------------------------------------------------------------


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="send realistic multi-service traces to a receiver")
    p.add_argument("--endpoint", default=None, help="receiver base URL or host:port")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--spans", type=int, default=10_000, help="approximate number of spans")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--base-time-ns",
        type=int,
        default=None,
        help="time of the first trace (default: 10 minutes ago); fix it for identical output",
    )
    p.add_argument("--processes", type=int, default=6, help="process instances (>= services)")
    p.add_argument(
        "--mode",
        choices=["sdk", "raw"],
        default="sdk",
        help="sdk: OpenTelemetry SDK exporters; raw: pre-encoded 1,000-span requests (fast)",
    )
    p.add_argument("--concurrency", type=int, default=4, help="raw mode: concurrent clients")
    p.add_argument("--batch", type=int, default=1000, help="raw mode: spans per request")
    p.add_argument("--token", default=os.environ.get("OTELSPANS_TOKEN"))
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from otelspans_fdw.loadgen import send

    result = send.run(
        endpoint=args.endpoint,
        protocol=args.protocol,
        spans=args.spans,
        seed=args.seed,
        processes=args.processes,
        mode=args.mode,
        concurrency=args.concurrency,
        batch=args.batch,
        token=args.token or None,
        progress=not args.quiet,
        base_time_ns=args.base_time_ns,
    )
    print(json.dumps(result))
    return 0 if result["failed"] == 0 else 1


# --- status / migrate / cleanup ----------------------------------------------------------------


def add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status", help="counts of processes, streams, blocks and spans (+ a receiver's metrics)"
    )
    _common_db(p)
    p.add_argument(
        "--receiver",
        default=None,
        metavar="URL",
        help="also read this receiver's /metrics (e.g. http://127.0.0.1:4318)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from otelspans_fdw import db

    with db.connect(args.dsn) as conn:
        version = db.current_version(conn)
        counts = db.status_counts(conn) if version else {}
    receiver = None
    if args.receiver:
        from otelspans_fdw.ingest.scrape import scrape

        receiver = scrape(args.receiver)
    if args.json:
        out = {"schema_version": version, **counts}
        if receiver is not None:
            out["receiver"] = receiver
        print(json.dumps(out))
    else:
        print(f"schema_version {version}")
        for k, v in counts.items():
            print(f"{k:<14}{v:>14,}")
        if receiver is not None:
            from otelspans_fdw.ingest.scrape import format_summary

            print()
            print("\n".join(format_summary(receiver)))
    return 0


def add_migrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "migrate",
        help="install or update the otelspans extension (its tables), as its owner or a superuser",
    )
    _common_db(p)
    p.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    from otelspans_fdw import db

    with db.connect(args.dsn) as conn:
        n = db.migrate(conn)
        schema = db.extension_schema(conn)
        where = f"extension otelspans in schema {schema}" if schema else "no extension"
        print(f"applied {n} migration(s); schema version {db.current_version(conn)} ({where})")
    return 0


def add_cleanup(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cleanup", help="remove payloads no metadata row references")
    _common_db(p)
    _common_store(p)
    p.add_argument("--grace", type=float, default=3600.0, help="minimum age in seconds")
    p.set_defaults(func=cmd_cleanup)


def cmd_cleanup(args: argparse.Namespace) -> int:
    from otelspans_fdw import db
    from otelspans_fdw.ingest.cleanup import remove_orphans
    from otelspans_fdw.objstore import open_store

    with db.connect(args.dsn) as conn:
        r = remove_orphans(open_store(args.store), conn, grace_seconds=args.grace)
    print(f"scanned {r.scanned}, removed {r.orphans} orphan(s) and {r.temp_files} temp file(s)")
    return 0


# --- trace (issue 6) ---------------------------------------------------------------------------


def add_trace(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="print one trace across services as a waterfall")
    p.add_argument("trace_id", metavar="TRACE_ID", help="32 hex digits")
    p.add_argument(
        "--dsn",
        default=None,
        help="database with the otelspans extension (default $OTELSPANS_DSN or PG* vars)",
    )
    p.add_argument("--width", type=int, default=None, help="columns (default: the terminal's)")
    p.set_defaults(func=cmd_trace)


def cmd_trace(args: argparse.Namespace) -> int:
    import shutil

    import psycopg

    from otelspans_fdw import db
    from otelspans_fdw.waterfall import fetch_trace, render_waterfall

    width = args.width or shutil.get_terminal_size((120, 24)).columns
    with db.connect(args.dsn) as conn:
        try:
            spans = fetch_trace(conn, args.trace_id)
        except psycopg.errors.UndefinedFunction as e:
            raise OtelSpansError(
                "otel_trace() is not installed in this database",
                hint="Run CREATE EXTENSION otelspans there, or give --dsn of that database.",
            ) from e
        except psycopg.Error as e:  # e.g. the wrapper's ERROR: show it, not a traceback
            d = e.diag
            raise OtelSpansError(d.message_primary or str(e), hint=d.message_hint) from e
    sys.stdout.write(render_waterfall(args.trace_id, spans, width=width))
    return 0 if spans else 1


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_serve,
    add_ingest,
    add_generate,
    add_status,
    add_migrate,
    add_cleanup,
    add_trace,
    add_retention,
    add_publish,
    add_materialise,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otelspans", description="OpenTelemetry spans in PostgreSQL: receiver and tools."
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except OtelSpansError as e:
        print(f"otelspans: error: {e}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
