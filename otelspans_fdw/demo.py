"""``make demo``: a local PostgreSQL, the receiver, demo traffic over OTLP, example queries.

Everything lives under one directory (default ``/var/lib/otelspans/demo``, owned by the
``postgres`` user because the server and the wrapper in its backends write there): the
cluster, the object store, the receiver's log and pid file.  ``start`` is idempotent: a second
run reuses the running cluster and receiver and just sends more traffic; ``stop`` stops both
and leaves the data for the next start.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg

from otelspans_fdw.devcluster import SERVICE_USER, LocalCluster

DEFAULT_BASE = Path(os.environ.get("OTELSPANS_DEMO_DIR", "/var/lib/otelspans/demo"))
DEFAULT_PORT = int(os.environ.get("OTELSPANS_DEMO_PGPORT", "5433"))
DBNAME = "otelspans"
#: A login with the reader grant only: the example queries run as it, as an analyst's would.
READER = "otel_reader"
READER_PASSWORD = os.environ.get("OTELSPANS_DEMO_READER_PASSWORD", "otel_reader")
HTTP_PORT = int(os.environ.get("OTELSPANS_DEMO_HTTP_PORT", "4318"))
GRPC_PORT = int(os.environ.get("OTELSPANS_DEMO_GRPC_PORT", "4317"))

#: The example queries: (title, SQL).  Each one joins spans with the native process table.
EXAMPLES: list[tuple[str, str]] = [
    (
        "Latency per process",
        """SELECT p.exe, p.computer, count(*) AS spans,
       round(avg(s.duration) / 1e6, 2) AS avg_ms, round(max(s.duration) / 1e6, 2) AS max_ms
  FROM otel_processes p JOIN otel_spans s USING (process_id)
 GROUP BY 1, 2 ORDER BY 1, 2""",
    ),
    (
        "Errors by span name",
        """SELECT s.name, count(*) AS errors
  FROM otel_processes p JOIN otel_spans s USING (process_id)
 WHERE s.status = 'ERROR'
 GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 10""",
    ),
    (
        "p50 / p95 latency per service (server spans)",
        """SELECT p.service_name,
       round((percentile_cont(0.5) WITHIN GROUP (ORDER BY s.duration) / 1e6)::numeric, 2) AS p50_ms,
       round((percentile_cont(0.95) WITHIN GROUP (ORDER BY s.duration) / 1e6)::numeric, 2) AS p95_ms
  FROM otel_processes p JOIN otel_spans s USING (process_id)
 WHERE s.kind = 'SERVER'
 GROUP BY 1 ORDER BY 1""",
    ),
    (
        "Slowest spans of the last hour, with their process",
        """SELECT p.exe, s.name, s.trace_id, round(s.duration / 1e6, 2) AS ms
  FROM otel_processes p JOIN otel_spans s USING (process_id)
 WHERE s.start_time >= now() - interval '1 hour'
 ORDER BY s.duration DESC LIMIT 5""",
    ),
]


def _cluster(base: Path, port: int) -> LocalCluster:
    return LocalCluster(base, port=port, settings={"otelspans.python_path": "''"})


def _wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # the server answers
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing answers at {url}") from None
            time.sleep(0.2)


def _receiver_pid(base: Path, name: str = "receiver") -> int | None:
    """The pid of the demo's receiver (or ``follower``) if it runs."""
    try:
        pid = int((base / f"{name}.pid").read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def start(base: Path, port: int, spans: int) -> int:
    cluster = _cluster(base, port)
    print(f"== PostgreSQL in {cluster.datadir} on port {port}", flush=True)
    cluster.init()
    if not cluster.is_running():
        cluster.start()
    cluster.wait_ready()
    with psycopg.connect(cluster.dsn(), autocommit=True) as c:
        if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DBNAME,)).fetchone():
            c.execute(f"CREATE DATABASE {DBNAME}")
    dsn = cluster.dsn(DBNAME)
    store = base / "store"
    store.mkdir(exist_ok=True)
    os.chmod(store, 0o755)
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", f"{SERVICE_USER}:", str(store), str(base)], check=True)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS otelspans")
        _set_server_option(c, "otel_spans_server", "store", str(store))
        _reader_login(c)
    exe = Path(sys.executable).with_name("otelspans")

    as_service = ["runuser", "-u", SERVICE_USER, "--"] if os.geteuid() == 0 else []
    if _receiver_pid(base) is None:
        print(f"== receiver on 127.0.0.1:{HTTP_PORT} (HTTP) and :{GRPC_PORT} (gRPC)", flush=True)
        log = open(base / "receiver.log", "ab")  # handed to the child
        proc = subprocess.Popen(
            [
                *as_service,
                str(exe),
                "serve",
                "--dsn",
                dsn,
                "--store",
                str(store),
                "--http-port",
                str(HTTP_PORT),
                "--grpc-port",
                str(GRPC_PORT),
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        (base / "receiver.pid").write_text(str(proc.pid))
    _wait_http(f"http://127.0.0.1:{HTTP_PORT}/v1/traces")
    if _receiver_pid(base, "follower") is None:
        # Partitions built a few seconds behind ingestion, so the queries below only read.
        print("== materialisation follower (otelspans materialise --follow)", flush=True)
        log = open(base / "follower.log", "ab")  # handed to the child
        proc = subprocess.Popen(
            [*as_service, str(exe), "materialise", "--follow", "--dsn", dsn, "--store", str(store)],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        (base / "follower.pid").write_text(str(proc.pid))

    print(f"== sending about {spans} spans of demo traffic over OTLP/HTTP", flush=True)
    subprocess.run(
        [
            str(exe),
            "generate",
            "--endpoint",
            f"http://127.0.0.1:{HTTP_PORT}",
            "--spans",
            str(spans),
            "--processes",
            "8",
        ],
        check=True,
    )
    for title, sql in EXAMPLES:
        print(f"\n== {title} (as {READER})\n{sql};\n", flush=True)
        subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                READER,
                "-d",
                DBNAME,
                "-v",
                "ON_ERROR_STOP=1",
                "-P",
                "pager=off",
                "-c",
                sql,
            ],
            check=True,
            env={**os.environ, "PGPASSWORD": READER_PASSWORD},
        )
    print(
        "\nThe demo is running.\n"
        f"  connect as a reader (SELECT only, what an analyst or a BI tool gets):\n"
        f"            PGPASSWORD={READER_PASSWORD}"
        f" psql -h 127.0.0.1 -p {port} -U {READER} {DBNAME}\n"
        f"            JDBC: jdbc:postgresql://127.0.0.1:{port}/{DBNAME}"
        f" user {READER} password {READER_PASSWORD}\n"
        f"  as the superuser: psql -h 127.0.0.1 -p {port} -U postgres {DBNAME}\n"
        f"  send OTLP: OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:{HTTP_PORT}\n"
        "  stop:     make demo-stop"
    )
    return 0


def _reader_login(conn: psycopg.Connection) -> None:
    """The demo's reader: a login in the otelspans_reader group role, nothing else."""
    from psycopg import sql

    if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (READER,)).fetchone():
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(READER), sql.Literal(READER_PASSWORD)
            )
        )
    conn.execute(sql.SQL("GRANT otelspans_reader TO {}").format(sql.Identifier(READER)))


def _set_server_option(conn: psycopg.Connection, server: str, name: str, value: str) -> None:
    """ALTER SERVER ... OPTIONS (ADD or SET name value), whichever applies."""
    from psycopg import sql

    row = conn.execute(
        "SELECT coalesce(%s = ANY (SELECT split_part(o, '=', 1) FROM unnest(srvoptions) o), false)"
        " FROM pg_foreign_server WHERE srvname = %s",
        (name, server),
    ).fetchone()
    verb = sql.SQL("SET" if row and row[0] else "ADD")
    conn.execute(
        sql.SQL("ALTER SERVER {} OPTIONS ({} {} {})").format(
            sql.Identifier(server), verb, sql.Identifier(name), sql.Literal(value)
        )
    )


def stop(base: Path, port: int) -> int:
    for name in ("follower", "receiver"):
        pid = _receiver_pid(base, name)
        if pid is not None:
            os.killpg(pid, signal.SIGTERM)
            for _ in range(100):
                if _receiver_pid(base, name) is None:
                    break
                time.sleep(0.1)
        (base / f"{name}.pid").unlink(missing_ok=True)
    _cluster(base, port).stop()
    print(f"demo stopped (data kept in {base})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m otelspans_fdw.demo")
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--dir", type=Path, default=DEFAULT_BASE)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument(
        "--spans", type=int, default=int(os.environ.get("OTELSPANS_DEMO_SPANS", "20000"))
    )
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.action == "start":
        return start(args.dir, args.port, args.spans)
    return stop(args.dir, args.port)


if __name__ == "__main__":
    sys.exit(main())
