"""Memory safety of the host: values a mapping row creates, and many short sessions."""

from __future__ import annotations

import re
import uuid

import psycopg
import pytest
from psycopg import errors

from otelspans_fdw.devcluster import LocalCluster

BIG = 4 << 20


def test_values_a_mapping_computes_are_converted_before_release(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        c.execute("CREATE EXTENSION otelspans")
        c.execute(
            "CREATE SERVER computed FOREIGN DATA WRAPPER otelspans_fdw"
            " OPTIONS (wrapper 'safety_wrappers.ComputedRows')"
        )
        c.execute("CREATE FOREIGN TABLE computed (id int8, big text) SERVER computed")
        rows = c.execute("SELECT id, length(big), right(big, 3) FROM computed").fetchall()
        assert rows == [(i * 1_000_003, BIG + len(str(i)), ("xx" + str(i))[-3:]) for i in range(20)]
        assert c.execute("SELECT 1").fetchone() == (1,)  # the backend is alive


CRASH = re.compile(r"terminated by signal|exited with exit code [1-9]|was terminated|PANIC")


def test_many_short_sessions_leave_no_crashed_backend(fresh_dsn: str, pg: LocalCluster) -> None:
    """Connect as a plain role, fail a privileged statement, EXPLAIN VERBOSE a foreign scan,
    disconnect; a few dozen times.  A backend dying at exit shows only in the server log."""
    role = f"plain_{uuid.uuid4().hex[:6]}"
    dbname = psycopg.conninfo.conninfo_to_dict(fresh_dsn)["dbname"]
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        c.execute("CREATE EXTENSION otelspans")
        c.execute(
            "CREATE SERVER computed FOREIGN DATA WRAPPER otelspans_fdw"
            " OPTIONS (wrapper 'safety_wrappers.ComputedRows', rows '3')"
        )
        c.execute("CREATE FOREIGN TABLE computed (id int8, big text) SERVER computed")
        c.execute("CREATE USER MAPPING FOR CURRENT_USER SERVER computed")
        c.execute(f"CREATE ROLE {role} LOGIN")
        c.execute(f"GRANT SELECT ON computed, otel_spans TO {role}")
    before = len(pg.server_log())
    try:
        for i in range(40):
            with psycopg.connect(pg.dsn(dbname, user=role), autocommit=True) as s:
                with pytest.raises(errors.InsufficientPrivilege):
                    s.execute("ALTER USER MAPPING FOR postgres SERVER computed OPTIONS (ADD x '1')")
                plan = s.execute("EXPLAIN VERBOSE SELECT id FROM computed WHERE id > 1").fetchall()
                assert any("Foreign Scan" in r[0] for r in plan)
                if i % 4 == 0:
                    assert len(s.execute("SELECT * FROM computed").fetchall()) == 3
                    with pytest.raises(psycopg.Error):
                        s.execute("SELECT * FROM otel_spans")  # no process_id: an ERROR
    finally:
        with psycopg.connect(fresh_dsn, autocommit=True) as c:
            c.execute(f"DROP OWNED BY {role}")
            c.execute(f"DROP ROLE {role}")
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        c.execute("SELECT pg_sleep(0.2)")  # let the last backends finish exiting
    log = pg.server_log()[before:]
    assert not CRASH.search(log), CRASH.search(log)
