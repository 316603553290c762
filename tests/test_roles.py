"""Ordinary roles on a cluster with Debian's default authentication.

``pg_hba.conf`` here is what a fresh Debian install has: local sockets ``peer``, TCP
``scram-sha-256`` with passwords, nothing trusted.  The extension lives in a schema of its own
(``otelspans``), found through the database's ``search_path`` as an administrator would set
it.  A reader gets one grant (``otelspans_reader``) and nothing else; every test talks to the
server over TCP with a password, as a BI tool does.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from conftest import python_sources
from psycopg import errors
from spans_helpers import Ingested, make_resource_spans

from otelspans_fdw import db
from otelspans_fdw.devcluster import PG_BINDIR, LocalCluster
from otelspans_fdw.lake.partitions import LAKE_MIGRATIONS
from otelspans_fdw.objstore import LocalStore

SUPER_PW = "super-" + uuid.uuid4().hex[:8]
READER, READER_PW = "alice", "alice-" + uuid.uuid4().hex[:8]
OTHER, OTHER_PW = "mallory", "mallory-" + uuid.uuid4().hex[:8]
DBNAME = "lake"


@dataclass
class RolesDB:
    cluster: LocalCluster
    store_dir: Path
    ing: Ingested
    pids: list[uuid.UUID]
    trace_id: str

    def su(self) -> psycopg.Connection:
        return psycopg.connect(self.cluster.dsn(DBNAME), autocommit=True)

    def login(self, user: str, password: str) -> psycopg.Connection:
        return psycopg.connect(self.cluster.dsn(DBNAME, user, password), autocommit=True)


@pytest.fixture(scope="module")
def rdb() -> Iterator[RolesDB]:
    base = Path(tempfile.mkdtemp(prefix="otelspans-roles-"))
    cluster = LocalCluster(base, auth_local="peer", auth_host="scram-sha-256", password=SUPER_PW)
    cluster.init(python_sources())
    cluster.start()
    try:
        hba = (cluster.datadir / "pg_hba.conf").read_text()
        rules = [ln.split() for ln in hba.splitlines() if ln.strip() and not ln.startswith("#")]
        assert {r[-1] for r in rules if r[0] == "local"} == {"peer"}
        assert {r[-1] for r in rules if r[0] == "host"} == {"scram-sha-256"}
        with psycopg.connect(cluster.dsn(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {DBNAME}")
        store_dir = base / "store"
        store_dir.mkdir()
        os.chmod(store_dir, 0o777)
        with psycopg.connect(cluster.dsn(DBNAME), autocommit=True) as c:
            c.execute("CREATE SCHEMA otelspans")
            c.execute("CREATE EXTENSION otelspans SCHEMA otelspans")
            c.execute(f'ALTER DATABASE {DBNAME} SET search_path = "$user", public, otelspans')
            c.execute(f"ALTER SERVER otel_spans_server OPTIONS (ADD store '{store_dir}')")
            c.execute(f"CREATE ROLE {READER} LOGIN PASSWORD '{READER_PW}'")
            c.execute(f"GRANT otelspans_reader TO {READER}")
            c.execute(f"CREATE ROLE {OTHER} LOGIN PASSWORD '{OTHER_PW}'")
        ing = Ingested(cluster.dsn(DBNAME), LocalStore(store_dir, durable=False))
        now_ns = time.time_ns()
        pids = []
        for i, svc in enumerate(["cart", "pay", "ship"]):
            b = ing.add(
                make_resource_spans(
                    service=svc, pid=100 + i, n=20, base_ns=now_ns - 3600 * 10**9, seed=i
                )
            )
            with psycopg.connect(cluster.dsn(DBNAME)) as c:
                row = c.execute(
                    "SELECT process_id FROM otelspans.otel_blocks WHERE block_id = %s", (b,)
                ).fetchone()
                assert row is not None
                pids.append(row[0])
        trace_id = ing.expected()[0]["trace_id"]
        yield RolesDB(cluster, store_dir, ing, pids, trace_id)
    finally:
        cluster.destroy()


def relations(c: psycopg.Connection) -> set[str]:
    return {
        r[0]
        for r in c.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'otelspans'::regnamespace"
        )
    }


def test_reader_queries_every_form_and_writes_nothing(rdb: RolesDB) -> None:
    with rdb.su() as su:
        before = relations(su)
        owners = {
            r[0]
            for r in su.execute(
                "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class"
                " WHERE relnamespace = 'otelspans'::regnamespace"
            )
        }
        assert owners == {"postgres"}
    want = rdb.ing.expected()
    with rdb.login(READER, READER_PW) as c:
        pid = rdb.pids[0]
        n = c.execute("SELECT count(*) FROM otel_spans WHERE process_id = %s", (pid,)).fetchone()
        assert n == (sum(1 for r in want if r["process_id"] == pid),)
        got = c.execute(
            "SELECT count(*) FROM otel_processes p JOIN otel_spans s USING (process_id)"
            " WHERE p.service_name = 'pay'"
        ).fetchone()
        assert got == (sum(1 for r in want if r["service_name"] == "pay"),)
        trace = c.execute("SELECT count(*) FROM otel_spans WHERE trace_id = %s", (rdb.trace_id,))
        assert trace.fetchone() == (sum(1 for r in want if r["trace_id"] == rdb.trace_id),)
        tree = c.execute("SELECT span_id FROM otel_trace(%s)", (rdb.trace_id,)).fetchall()
        assert len({r[0] for r in tree}) == len(
            {r["span_id"] for r in want if r["trace_id"] == rdb.trace_id}
        )
        window = c.execute(
            "SELECT count(*) FROM otel_spans WHERE start_time >= now() - interval '12 hours'"
            " AND start_time < now()"
        ).fetchone()
        assert window == (len(want),)
        assert c.execute("SELECT count(*) FROM otel_spans(%s)", (pid,)).fetchone() == n
        c.execute("SELECT * FROM otel_service_map(now() - interval '12 hours', now())")
        for table in ("otel_blocks", "otel_streams", "otel_partitions", "otel_partition_files"):
            assert c.execute(f"SELECT count(*) FROM {table}").fetchone()[0] > 0  # type: ignore[index]

        # Nothing to write, create or own in the extension's schema.
        refused = [
            "INSERT INTO otel_retired_files (path, retired_at) VALUES ('blobs/x', '2000-01-01')",
            "DELETE FROM otel_partitions",
            "UPDATE otel_blocks SET nb_spans = 0",
            "CREATE TABLE otelspans.mine (x int)",
            "CREATE TRIGGER t BEFORE INSERT ON otel_partitions"
            " FOR EACH ROW EXECUTE FUNCTION pg_temp.trig()",
            "SELECT otelspans_call('os.getcwd')",
            "SELECT otel_retention('1 day')",
            "SELECT otel_publish()",
            "ALTER SERVER otel_spans_server OPTIONS (ADD max_window '1 year')",
        ]
        c.execute(
            "CREATE FUNCTION pg_temp.trig() RETURNS trigger LANGUAGE plpgsql"
            " AS $$BEGIN RETURN NEW; END$$"
        )
        for stmt in refused:
            with pytest.raises(errors.InsufficientPrivilege):
                c.execute(stmt)
        with rdb.su() as su:
            assert relations(su) == before  # the scans created nothing
            assert su.execute("SELECT count(*) FROM otel_retired_files").fetchone() == (0,)
            # While her session lives, its lake connection is a local-socket (peer) login
            # as the extension's owner.
            lake = su.execute(
                "SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = %s"
                " AND backend_type = 'client backend' AND client_addr IS NULL",
                (DBNAME,),
            ).fetchall()
            assert lake == [("postgres",)]


def test_set_role_after_a_first_scan(rdb: RolesDB) -> None:
    pid = rdb.pids[1]
    q = "SELECT count(*) FROM otelspans.otel_spans WHERE process_id = %s"
    with rdb.su() as su:
        full = su.execute(q, (pid,)).fetchone()
        su.execute(f"SET ROLE {READER}")
        assert su.execute(q, (pid,)).fetchone() == full
        with pytest.raises(errors.InsufficientPrivilege):
            su.execute("INSERT INTO otel_retired_files (path) VALUES ('blobs/y')")
        su.execute(f"SET ROLE {OTHER}")  # no grant: PostgreSQL's own check still applies
        with pytest.raises(errors.InsufficientPrivilege) as e:
            su.execute(q, (pid,))
        assert "otelspans" in str(e.value.diag.message_primary)  # no USAGE on the schema
        su.execute("RESET ROLE")
        su.execute(f"GRANT USAGE ON SCHEMA otelspans TO {OTHER}")
        su.execute(f"SET ROLE {OTHER}")
        with pytest.raises(errors.InsufficientPrivilege) as e:
            su.execute(q, (pid,))
        assert "otel_spans" in str(e.value.diag.message_primary)  # no SELECT on the table
        su.execute("RESET ROLE")
        su.execute(f"REVOKE USAGE ON SCHEMA otelspans FROM {OTHER}")
        su.execute("RESET ROLE")
        assert su.execute(q, (pid,)).fetchone() == full


def test_connection_options_are_superuser_and_server_only(rdb: RolesDB) -> None:
    evil = "host=/tmp user=postgres options=-csearch_path=evil"
    with rdb.su() as su:
        su.execute(f"GRANT USAGE ON FOREIGN SERVER otel_spans_server TO {OTHER}")
        su.execute(f"GRANT USAGE ON FOREIGN DATA WRAPPER otelspans_fdw TO {OTHER}")
        su.execute(f"GRANT CREATE ON SCHEMA public TO {OTHER}")
        try:
            with rdb.login(OTHER, OTHER_PW) as c:
                attempts = [
                    f"CREATE USER MAPPING FOR CURRENT_USER SERVER otel_spans_server"
                    f" OPTIONS (dsn '{evil}')",
                    "CREATE USER MAPPING FOR CURRENT_USER SERVER otel_spans_server"
                    " OPTIONS (store '/var/lib/postgresql')",
                    "CREATE USER MAPPING FOR CURRENT_USER SERVER otel_spans_server"
                    " OPTIONS (aws_access_key_id 'k', aws_secret_access_key 's')",
                    "CREATE FOREIGN TABLE public.mine (span_id text) SERVER otel_spans_server"
                    f" OPTIONS (dsn '{evil}')",
                    "CREATE FOREIGN TABLE public.mine (span_id text) SERVER otel_spans_server"
                    " OPTIONS (aws_endpoint_url 'http://127.0.0.1:1')",
                    "CREATE FOREIGN TABLE public.mine (span_id text) SERVER otel_spans_server"
                    " OPTIONS (max_window '100 years')",
                    f"CREATE SERVER mine FOREIGN DATA WRAPPER otelspans_fdw OPTIONS (dsn '{evil}')",
                    "CREATE SERVER mine FOREIGN DATA WRAPPER otelspans_fdw"
                    " OPTIONS (wrapper 'otelspans_fdw.fdw.OtelSpansFDW')",
                ]
                for stmt in attempts:
                    with pytest.raises(psycopg.Error) as e:
                        c.execute(stmt)
                    assert isinstance(
                        e.value, errors.InsufficientPrivilege | errors.FdwInvalidOptionName
                    ), stmt
                    assert e.value.diag.message_hint, stmt
                    assert "superuser" in e.value.diag.message_hint, stmt
            # Server-only holds for a superuser too: foreign table options are readable by all.
            with pytest.raises(errors.FdwInvalidOptionName) as e:
                su.execute(
                    "CREATE FOREIGN TABLE public.t2 (span_id text) SERVER otel_spans_server"
                    f" OPTIONS (store '{rdb.store_dir}')"
                )
            assert "can only be set on a foreign server" in str(e.value.diag.message_primary)
            su.execute(
                "CREATE USER MAPPING FOR PUBLIC SERVER otel_spans_server"
                " OPTIONS (aws_access_key_id 'lake-key', aws_secret_access_key 'lake-secret')"
            )
            with rdb.login(OTHER, OTHER_PW) as c:
                shown = c.execute(
                    "SELECT umoptions FROM pg_user_mappings WHERE srvname = 'otel_spans_server'"
                ).fetchall()
                assert shown == [(None,)]  # the lake's keys stay hidden
        finally:
            su.execute("DROP USER MAPPING IF EXISTS FOR PUBLIC SERVER otel_spans_server")
            su.execute(f"REVOKE CREATE ON SCHEMA public FROM {OTHER}")
            su.execute(f"REVOKE USAGE ON FOREIGN DATA WRAPPER otelspans_fdw FROM {OTHER}")
            su.execute(f"REVOKE USAGE ON FOREIGN SERVER otel_spans_server FROM {OTHER}")


def test_pg_dump_and_restore_keep_the_metadata(rdb: RolesDB, tmp_path: Path) -> None:
    q = (
        "SELECT (SELECT count(*) FROM otel_processes), (SELECT count(*) FROM otel_blocks),"
        " (SELECT count(*) FROM otel_trace_blocks), (SELECT count(*) FROM otel_partitions),"
        # the block summaries are not dumped: restoring the blocks rebuilds them, once
        " (SELECT sum(nb_blocks) FROM otel_block_hours),"
        " (SELECT sum(nb_blocks) FROM otel_process_blocks)"
    )
    with rdb.su() as su:
        su.execute("SELECT count(*) FROM otel_spans WHERE process_id = %s", (rdb.pids[2],))
        want = su.execute(q).fetchone()
    assert want is not None and min(want) > 0
    dump = tmp_path / "lake.dump"
    env = {**os.environ, "PGPASSWORD": SUPER_PW}
    conn_args = ["-h", "127.0.0.1", "-p", str(rdb.cluster.port), "-U", "postgres"]
    subprocess.run(
        [str(PG_BINDIR / "pg_dump"), *conn_args, "-Fc", "-f", str(dump), DBNAME],
        check=True,
        env=env,
    )
    with psycopg.connect(rdb.cluster.dsn(), autocommit=True) as c:
        c.execute("CREATE DATABASE restored")
    try:
        r = subprocess.run(
            [str(PG_BINDIR / "pg_restore"), *conn_args, "-d", "restored", str(dump)],
            env=env,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        with psycopg.connect(rdb.cluster.dsn("restored"), autocommit=True) as c:
            c.execute("SET search_path = otelspans")  # database settings are not dumped
            assert c.execute(q).fetchone() == want
            versions = c.execute(
                "SELECT (SELECT max(version) FROM otel_schema_version),"
                " (SELECT max(version) FROM otel_lake_schema_version)"
            ).fetchone()
            assert versions == (db.SCHEMA_VERSION, LAKE_MIGRATIONS[-1][0])
    finally:
        with psycopg.connect(rdb.cluster.dsn(), autocommit=True) as c:
            c.execute("DROP DATABASE IF EXISTS restored WITH (FORCE)")


def test_an_older_schema_is_an_error_naming_the_upgrade(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        c.execute("CREATE EXTENSION otelspans")
        c.execute("DELETE FROM otel_lake_schema_version WHERE version = 2")
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        with pytest.raises(psycopg.Error) as e:
            c.execute("SELECT count(*) FROM otel_spans WHERE process_id = %s", (uuid.uuid4(),))
        assert "older than the installed code" in str(e.value.diag.message_primary)
        assert "ALTER EXTENSION otelspans UPDATE" in (e.value.diag.message_hint or "")
        assert c.execute("SELECT to_regclass('otel_published_files') IS NOT NULL").fetchone() == (
            True,
        )


def test_generated_extension_sql_is_current() -> None:
    from otelspans_fdw.sqlgen import EXTENSION_VERSIONS, metadata_sql, update_sql

    root = Path(__file__).resolve().parent.parent
    assert (root / "sql" / "otel_metadata.sql").read_text() == metadata_sql()
    control = (root / "ext" / "otelspans.control").read_text()
    assert f"default_version = '{EXTENSION_VERSIONS[-1][0]}'" in control
    for (old, _), (new, _) in itertools.pairwise(EXTENSION_VERSIONS):
        path = root / "sql" / f"otelspans--{old}--{new}.sql"
        assert path.read_text() == update_sql(old, new)


def test_reader_preview_and_dashboard_ranges(rdb: RolesDB) -> None:
    """A BI tool's preview, "last 7 days" over data inserted over days, timestamp and date
    windows: all as the reader, through the wrapper, compared with the ingested rows."""
    day_ns = 86400 * 10**9
    now_ns = time.time_ns()
    for days in (6, 4, 2):
        rdb.ing.add(
            make_resource_spans(
                service="batch", pid=200 + days, n=10, base_ns=now_ns - days * day_ns, seed=days
            ),
            insert_time=dt.datetime.fromtimestamp((now_ns - days * day_ns) / 1e9, dt.UTC),
        )
    want = rdb.ing.expected()
    newest = sorted(want, key=lambda r: r["start_time"], reverse=True)
    with rdb.login(READER, READER_PW) as c:
        got = c.execute("SELECT span_id, start_time FROM otel_spans LIMIT 7").fetchall()
        assert len(got) == 7
        assert [r[1] for r in got] == sorted((r[1] for r in got), reverse=True)
        # the newest partition's spans: the three recent processes of the fixture
        recent = {r["span_id"] for r in want if r["service_name"] in ("cart", "pay", "ship")}
        assert {r[0] for r in got} <= recent
        # Sorted preview: exactly the newest spans, wherever they were inserted.
        top = c.execute(
            "SELECT span_id, start_time FROM otel_spans ORDER BY start_time DESC LIMIT 5"
        ).fetchall()
        assert [r[1] for r in top] == [r["start_time"] for r in newest[:5]]
        # ...also with filters: the newest matching spans, however far back they are.
        for status in ("ERROR", "OK", "no-such-status"):
            got = c.execute(
                "SELECT start_time FROM otel_spans WHERE status = %s"
                " ORDER BY start_time DESC LIMIT 4",
                (status,),
            ).fetchall()
            assert [r[0] for r in got] == [
                r["start_time"] for r in newest if r["status"] == status
            ][:4], status
        week = c.execute(
            "SELECT count(*) FROM otel_spans WHERE start_time >= now() - interval '7 days'"
        ).fetchone()
        assert week == (len(want),)
        two = c.execute(
            "SELECT count(*) FROM otel_spans WHERE start_time >= now() - interval '3 days'"
        ).fetchone()
        cut = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
        assert two == (sum(1 for r in want if r["start_time"] >= cut),)
        c.execute("SET TimeZone = 'America/New_York'")
        local = (dt.datetime.now(dt.UTC) - dt.timedelta(days=5)).astimezone(
            dt.timezone(dt.timedelta(hours=-5))
        )
        naive = c.execute(
            "SELECT count(*) FROM otel_spans WHERE start_time >= %s::timestamp",
            (local.replace(tzinfo=None).isoformat(),),
        ).fetchone()
        exact = c.execute(
            "SELECT count(*) FROM otel_spans WHERE start_time >= %s::timestamp"
            " AND process_id IS NOT NULL AND start_time >= now() - interval '30 days'",
            (local.replace(tzinfo=None).isoformat(),),
        ).fetchone()
        assert naive == exact and naive is not None and 0 < naive[0] < len(want)
        dated = c.execute(
            "SELECT count(*) FROM otel_spans WHERE start_time >= current_date - 1"
        ).fetchone()
        explained = c.execute(
            "EXPLAIN SELECT * FROM otel_spans WHERE start_time >= current_date - 1"
        ).fetchall()
        assert not any("Refused" in r[0] for r in explained)
        tz_midnight = c.execute("SELECT (current_date - 1)::timestamptz").fetchone()[0]  # type: ignore[index]
        assert dated == (sum(1 for r in want if r["start_time"] >= tz_midnight),)
        for stmt in (
            "SELECT * FROM otel_service_map(now() - interval '3 days', now())",
            "SELECT * FROM otel_service_map(now() - interval '7 days', now())",
        ):
            c.execute(stmt).fetchall()
    assert newest  # the ingest helper's rows exist


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), keys
    return dict(pairs)


def test_explain_documents_are_valid_and_refusals_log_no_traceback(rdb: RolesDB) -> None:
    import json
    import xml.etree.ElementTree as ET

    q = f"SELECT * FROM otel_spans WHERE process_id = '{rdb.pids[0]}'"
    with rdb.login(READER, READER_PW) as c:
        doc = c.execute(f"EXPLAIN (FORMAT JSON) {q}").fetchone()[0]  # type: ignore[index]
        plan = json.loads(json.dumps(doc), object_pairs_hook=_no_duplicate_keys)[0]["Plan"]
        assert plan["Node Type"] == "Foreign Scan"
        assert isinstance(plan["Wrapper"], list) and plan["Wrapper"][0] == "Found by: process"
        xml = c.execute(f"EXPLAIN (FORMAT XML) {q}").fetchone()[0]  # type: ignore[index]
        node = ET.fromstring(xml).find(".//{http://www.postgresql.org/2009/explain}Wrapper")
        assert node is not None and len(node) == len(plan["Wrapper"])
        yaml = c.execute(f"EXPLAIN (FORMAT YAML) {q}").fetchone()[0]  # type: ignore[index]
        assert yaml.count("Wrapper:") == 1
        text = [r[0] for r in c.execute(f"EXPLAIN {q}")]
        assert sum(ln.strip().startswith("Wrapper: ") for ln in text) == len(plan["Wrapper"])

        logfile = rdb.cluster.logfile
        start = logfile.stat().st_size
        with pytest.raises(errors.InvalidParameterValue):
            c.execute("SELECT * FROM otel_spans WHERE name = 'charge'")
        with open(logfile, errors="replace") as f:
            f.seek(start)
            logged = f.read()
        assert "needs a process_id, trace_id or time window condition" in logged
        assert "Traceback" not in logged


def test_process_attributes_select_processes_and_joins_estimate_sanely(rdb: RolesDB) -> None:
    import json

    want = rdb.ing.expected()
    with rdb.login(READER, READER_PW) as c:
        for cond, keep in (
            ("service_name = 'cart'", lambda r: r["service_name"] == "cart"),
            ("service_name IN ('cart', 'pay')", lambda r: r["service_name"] in ("cart", "pay")),
            (
                "computer = 'host-a' AND service_name = 'ship'",
                lambda r: r["service_name"] == "ship",
            ),
            ("service_name = 'nope'", lambda r: False),
        ):
            got = c.execute(f"SELECT count(*) FROM otel_spans WHERE {cond}").fetchone()
            assert got == (sum(1 for r in want if keep(r)),), cond
        lines = [r[0] for r in c.execute("EXPLAIN SELECT * FROM otel_spans WHERE exe = 'x/y'")]
        assert any("Found by: process" in ln for ln in lines)

        join = (
            "SELECT p.exe, count(*) FROM otel_processes p JOIN otel_spans s USING (process_id)"
            " WHERE p.service_name = 'pay' GROUP BY 1"
        )
        doc = c.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {join}").fetchone()[0]  # type: ignore[index]
        top = json.loads(json.dumps(doc))[0]
        assert "JIT" not in top  # the plan's cost stays under jit_above_cost
        assert top["Plan"]["Total Cost"] < 100000

        def rows_of(node: dict) -> list[tuple[str, float]]:
            out = [(node["Node Type"], node["Plan Rows"])]
            for child in node.get("Plans", []):
                out += rows_of(child)
            return out

        assert all(rows < 10**6 for _, rows in rows_of(top["Plan"])), rows_of(top["Plan"])
        assert c.execute(join).fetchall() == [
            ("pay", sum(1 for r in want if r["service_name"] == "pay"))
        ]


JDBC_JAR = Path("/usr/share/java/postgresql.jar")  # Debian's libpostgresql-jdbc-java


def test_jdbc_driver_as_a_reader(rdb: RolesDB, tmp_path: Path) -> None:
    """The PostgreSQL JDBC driver, as DBeaver or Metabase use it, over scram."""
    src = Path(__file__).resolve().parent / "jdbc" / "ReaderProbe.java"
    subprocess.run(
        ["javac", "-d", str(tmp_path), "-cp", str(JDBC_JAR), str(src)],
        check=True,
        capture_output=True,
    )
    since = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    pid = rdb.pids[0]
    r = subprocess.run(
        [
            "java",
            "-Duser.timezone=Europe/Paris",  # the session TimeZone pgjdbc sets
            "-cp",
            f"{tmp_path}:{JDBC_JAR}",
            "ReaderProbe",
            f"jdbc:postgresql://127.0.0.1:{rdb.cluster.port}/{DBNAME}",
            READER,
            READER_PW,
            str(pid),
            since.isoformat(),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out: dict[str, list[str]] = {}
    for line in r.stdout.splitlines():
        k, v = line.split("=", 1)
        out.setdefault(k, []).append(v)
    assert out["table"] == ["otelspans.otel_spans:FOREIGN TABLE"]
    want = rdb.ing.expected()
    assert out["preview"] == [str(min(200, len(want)))]
    recent = str(sum(1 for r in want if r["start_time"] >= since))
    for i in range(10):
        assert out[f"local{i}"] == [recent], i
        assert out[f"offset{i}"] == [recent], i
    assert out["cursor"] == [str(sum(1 for r in want if r["process_id"] == pid))]


def test_publish_brings_iceberg_up_to_every_span(rdb: RolesDB) -> None:
    """otel_publish() materialises what no query read yet, quietly, and with shared_files the
    warehouse is readable by another OS user."""
    import stat

    from otelspans_fdw.lake.publish import NAMESPACE, catalog_for

    now_ns = time.time_ns()
    rdb.ing.add(make_resource_spans(service="unread", pid=300, n=15, base_ns=now_ns, seed=9))
    want = rdb.ing.expected()
    logfile = rdb.cluster.logfile
    start = logfile.stat().st_size
    # The README's one-time step for files written before shared_files was on; what publishing
    # writes from here on is checked below to be readable without it.
    subprocess.run(["chmod", "-R", "a+rX", str(rdb.store_dir)], check=True)
    with rdb.su() as su:
        su.execute("ALTER SERVER otel_spans_server OPTIONS (ADD shared_files 'on')")
        try:
            began = time.time()
            published = su.execute("SELECT otel_publish()").fetchone()[0]
        finally:
            su.execute("ALTER SERVER otel_spans_server OPTIONS (DROP shared_files)")
    store = LocalStore(rdb.store_dir, durable=False)
    table = catalog_for(rdb.cluster.dsn(DBNAME), store).load_table((NAMESPACE, "otel_spans"))
    arrow = table.scan(selected_fields=("span_id",)).to_arrow()
    assert sorted(arrow.column("span_id").to_pylist()) == sorted(r["span_id"] for r in want)
    with open(logfile, errors="replace") as f:
        f.seek(start)
        assert "statistics missing" not in f.read()
    written = [
        p
        for p in (rdb.store_dir / "iceberg").rglob("*")
        if p.is_file() and p.stat().st_mtime >= began - 1
    ]
    assert written
    for p in written:
        assert p.stat().st_mode & stat.S_IROTH, p  # readable by another OS user
        assert p.parent.stat().st_mode & stat.S_IXOTH, p.parent
    # An outside engine, as another OS user, opens the table by its metadata location alone.
    location = published["metadata_location"]
    assert location == table.metadata_location
    assert _duckdb_iceberg_count(location, os_user="nobody") == len(want)


def _duckdb_iceberg_count(metadata_location: str, *, os_user: str) -> int:
    """count(*) of an Iceberg table read by DuckDB's iceberg extension (the one the package
    index ships as a wheel: no download at run time), in a process running as ``os_user``."""
    import sys

    script = (
        "import os, sys, duckdb, duckdb_ext\n"
        "ext = os.path.join(list(duckdb_ext.__path__)[0], 'extensions')\n"
        "con = duckdb.connect(config={'extension_directory': ext,"
        " 'autoinstall_known_extensions': False})\n"
        "con.execute('LOAD iceberg')\n"
        "print(con.execute('SELECT count(*) FROM iceberg_scan(?)', [sys.argv[1]]).fetchone()[0])\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, metadata_location],
        capture_output=True,
        text=True,
        user=os_user,
        env={"PATH": os.environ.get("PATH", "/usr/bin"), "HOME": "/tmp"},
        cwd="/tmp",
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip())


def test_publish_cli_finds_the_recorded_store(fresh_dsn: str, tmp_path: Path) -> None:
    import sys

    from otelspans_fdw import db as otel_db

    root = Path(__file__).resolve().parent.parent
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "OTELSPANS_STORE"}

    def publish_cli() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "otelspans_fdw.cli", "publish", "--dsn", fresh_dsn],
            capture_output=True,
            text=True,
            cwd=cwd,
            env={**env, "PYTHONPATH": str(root)},
            timeout=300,
        )

    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        otel_db.migrate(c)
    none = publish_cli()
    assert none.returncode != 0 and "Traceback" not in none.stderr
    assert "no object store" in none.stderr and "--store" in none.stderr
    store_dir = tmp_path / "store"
    ing = Ingested(fresh_dsn, LocalStore(store_dir, durable=False))
    ing.add(make_resource_spans(service="cli", pid=1, n=12, seed=4))
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        otel_db.pin_search_path(c)
        otel_db.record_setting(c, otel_db.STORE_URL_SETTING, str(store_dir))
    done = publish_cli()
    assert done.returncode == 0, done.stderr
    assert '"added": 1' in done.stdout
    assert not (cwd / "otelspans-data").exists()
    assert "statistics missing" not in done.stderr


def test_an_owner_peer_cannot_map_is_told_how_to_name_the_connection(rdb: RolesDB) -> None:
    """peer lets the server's OS user in only as postgres: an extension owned by another
    superuser needs the server option dsn, and the error says so (not "set PG* variables")."""
    with psycopg.connect(rdb.cluster.dsn(), autocommit=True) as c:
        c.execute("CREATE ROLE admin SUPERUSER LOGIN PASSWORD 'admin-pw'")
        c.execute("CREATE DATABASE other OWNER admin")
    q = "SELECT count(*) FROM otel_spans WHERE process_id = %s"
    with psycopg.connect(rdb.cluster.dsn("other", "admin", "admin-pw"), autocommit=True) as a:
        a.execute("CREATE EXTENSION otelspans")
        with pytest.raises(psycopg.Error) as e:
            a.execute(q, (uuid.uuid4(),))
        assert "Peer authentication failed" in str(e.value.diag.message_primary)
        hint = e.value.diag.message_hint or ""
        assert "extension's owner" in hint and "ADD dsn" in hint and "PG*" not in hint
        a.execute(
            "ALTER SERVER otel_spans_server OPTIONS (ADD dsn"
            f" 'host=127.0.0.1 port={rdb.cluster.port} dbname=other user=admin"
            " password=admin-pw')"
        )
        assert a.execute(q, (uuid.uuid4(),)).fetchone() == (0,)
