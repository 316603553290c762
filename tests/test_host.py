"""The host extension over real connections: planning, quals, row path, errors, control.

Wrappers live in tests/wrappers/host_wrappers.py; they report what they were handed as
NOTICEs, which these tests read from the connection.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal

import psycopg
import pytest
from host_wrappers import sample_row
from psycopg import errors

ECHO_COLUMNS = (
    "id int8, name text, ts timestamptz, u uuid, n numeric, flag bool, data bytea, "
    "tags text[], f float8, d date, j jsonb, small int2, nothing text"
)


class Session:
    """A connection that keeps the NOTICEs it receives."""

    def __init__(self, dsn: str):
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.notices: list[str] = []
        self.conn.add_notice_handler(lambda d: self.notices.append(d.message_primary or ""))

    def rows(self, sql: str, params: object = None) -> list[tuple]:
        self.notices.clear()
        return self.conn.execute(sql, params).fetchall()

    def plan(self, sql: str) -> str:
        return "\n".join(r[0] for r in self.conn.execute("EXPLAIN (VERBOSE) " + sql))

    def executes(self) -> list[str]:
        return [n for n in self.notices if n.startswith("execute ")]


@pytest.fixture
def db(fresh_dsn: str) -> Iterator[Session]:
    s = Session(fresh_dsn)
    s.conn.execute("CREATE EXTENSION otelspans")
    s.conn.execute(
        "CREATE SERVER echo FOREIGN DATA WRAPPER otelspans_fdw "
        "OPTIONS (wrapper 'host_wrappers.Echo')"
    )
    s.conn.execute(f"CREATE FOREIGN TABLE echo ({ECHO_COLUMNS}) SERVER echo")
    s.conn.execute(
        f"CREATE FOREIGN TABLE echo_seq ({ECHO_COLUMNS}) SERVER echo OPTIONS (sequence 'true')"
    )
    s.conn.execute(
        "CREATE FOREIGN TABLE big (id int8, name text) SERVER echo OPTIONS (rows '100000')"
    )
    s.conn.execute(
        "CREATE SERVER failing FOREIGN DATA WRAPPER otelspans_fdw "
        "OPTIONS (wrapper 'host_wrappers.Failing')"
    )
    try:
        yield s
    finally:
        s.conn.close()


def expected(i: int) -> tuple:
    r = sample_row(i)
    return (
        r["id"],
        r["name"],
        r["ts"],
        r["u"],
        r["n"],
        r["flag"],
        r["data"],
        r["tags"],
        r["f"],
        r["d"],
        r["j"],
        r["small"],
        r["nothing"],
    )


# --- row path: every type, mappings and sequences -------------------------------------


@pytest.mark.parametrize("table", ["echo", "echo_seq"])
def test_row_path_converts_every_type(db: Session, table: str) -> None:
    rows = db.rows(f"SELECT * FROM {table} ORDER BY id")
    assert rows == [expected(i) for i in range(20)]


def test_only_projected_columns_are_asked_for(db: Session) -> None:
    assert db.rows("SELECT name FROM echo WHERE small < 2 ORDER BY 1") == [("name0",), ("name1",)]
    assert db.executes() == [
        "execute quals=[small|<|2|int] columns=name,small sortkeys=[('name', False)] limit=None"
    ]


# --- quals -----------------------------------------------------------------------------


def test_const_quals_of_every_form(db: Session) -> None:
    u5 = sample_row(5)["u"]
    rows = db.rows(
        "SELECT id FROM echo WHERE id = 5 AND 'name5' = name AND u = %s "
        "AND ts >= '2024-01-01 00:05:00+00' AND n = 1.25 AND d = '2024-01-06' "
        "AND data = '\\x0500ff'::bytea AND tags = ARRAY['t5','x'] AND f <= 2.5 "
        "AND NOT flag AND nothing IS NULL AND name IS NOT NULL",
        (u5,),
    )
    assert rows == [(5,)]
    (line,) = db.executes()
    assert "id|=|5|int" in line
    assert "name|=|'name5'|str" in line  # commuted: Const op Var
    assert f"u|=|{u5!r}|UUID" in line
    assert (
        "ts|>=|datetime.datetime(2024, 1, 1, 0, 5, tzinfo=datetime.timezone.utc)|datetime|aware"
        in line
    )
    assert "n|=|Decimal('1.25')|Decimal" in line
    assert "d|=|datetime.date(2024, 1, 6)|date" in line
    assert "data|=|b'\\x05\\x00\\xff'|bytes" in line
    assert "tags|=|['t5', 'x']|list[str]" in line
    assert "f|<=|2.5|float" in line
    assert "flag|<>|True|bool" in line
    assert "nothing|=|None|NoneType" in line
    assert "name|<>|None|NoneType" in line


def test_boolean_column_and_microseconds(db: Session) -> None:
    rows = db.rows("SELECT id FROM echo WHERE flag AND ts > '2024-01-01 00:17:00.000016+00'")
    assert rows == [(18,)]
    (line,) = db.executes()
    assert "flag|=|True|bool" in line
    assert "microsecond" not in line and "17, 0, 16" in line


def test_in_list_and_any_array_are_list_quals(db: Session) -> None:
    assert db.rows("SELECT id FROM echo WHERE id IN (1, 3, 99) ORDER BY id") == [(1,), (3,)]
    assert "id|('=', True)|[1, 3, 99]|list[int]" in db.executes()[0]
    assert db.rows("SELECT id FROM echo WHERE id = ANY(%s) ORDER BY id", ([2, 4],)) == [(2,), (4,)]
    assert "id|('=', True)|[2, 4]|list[int]" in db.executes()[0]
    rows = db.rows("SELECT count(*) FROM echo WHERE id <> ALL(ARRAY[1,2])")
    assert rows == [(18,)]
    assert "id|('<>', False)|[1, 2]|list[int]" in db.executes()[0]


def test_stable_expressions_are_evaluated_at_execution(db: Session) -> None:
    rows = db.rows(
        "SELECT count(*) FROM echo WHERE ts < now() AND ts > now() - interval '100 years'"
    )
    assert rows == [(20,)]
    (line,) = db.executes()
    assert line.count("|datetime|aware") == 2


def test_unsupported_expressions_are_left_to_postgres_quietly(db: Session) -> None:
    rows = db.rows("SELECT id FROM echo WHERE id + 1 = 3 OR name = 'name7' ORDER BY id")
    assert rows == [(2,), (7,)]
    assert db.notices == ["execute quals=[] columns=id,name sortkeys=[('id', False)] limit=None"]
    rows = db.rows("SELECT id FROM echo WHERE id = (random() * 0)::int8 + 4")
    assert rows == [(4,)]
    assert db.executes()[0].startswith("execute quals=[]")


def test_prepared_statement_past_the_generic_plan_switch(db: Session) -> None:
    # With multicorn2's cost formula (rows * width) the custom plans of this tiny table stay
    # cheaper than the generic one, so PostgreSQL would keep replanning: force the generic plan.
    db.conn.execute("SET plan_cache_mode = force_generic_plan")
    db.conn.execute(
        "PREPARE p(int8, timestamptz) AS SELECT id, ts FROM echo WHERE id = $1 AND ts >= $2"
    )
    for i in range(12):
        rows = db.rows(f"EXECUTE p({i}, '2024-01-01 00:00:00+00')")
        assert rows == [(i, sample_row(i)["ts"])]
        (line,) = db.executes()
        assert f"id|=|{i}|int" in line
    plan = db.plan("EXECUTE p(3, now())")
    assert "$1" in plan  # the generic plan is in use and still pushes the parameter


def test_psycopg_server_side_parameters_and_cursor(db: Session) -> None:
    with db.conn.transaction(), db.conn.cursor(name="c") as cur:
        cur.execute("SELECT id FROM echo WHERE id < %s ORDER BY id", (15,))
        first = cur.fetchmany(5)
        rest = cur.fetchall()
    assert [r[0] for r in first + rest] == list(range(15))


# --- planner: parameterized paths, sort, limit -------------------------------------------


def test_join_with_native_table_is_a_parameterized_nested_loop(db: Session) -> None:
    db.conn.execute(
        "CREATE TABLE keys (k int8);"
        "INSERT INTO keys VALUES (3), (7), (1000), (200000); ANALYZE keys"
    )
    sql = "SELECT k, b.name FROM keys JOIN big b ON b.id = keys.k ORDER BY k"
    plan = db.plan(sql)
    assert "Nested Loop" in plan
    assert "Pushed Quals: id = (outer value)" in plan
    assert db.rows(sql) == [(3, "name3"), (7, "name7"), (1000, "name1000")]
    assert sorted(db.executes()) == sorted(
        f"execute quals=[id|=|{k}|int] columns=id,name sortkeys=[] limit=None"
        for k in (3, 7, 1000, 200000)
    )


def test_using_join_goes_through_equivalence_classes(db: Session) -> None:
    db.conn.execute("CREATE TABLE ids (id int8); INSERT INTO ids VALUES (5), (6); ANALYZE ids")
    sql = "SELECT id, name FROM ids JOIN big USING (id) ORDER BY id"
    assert "Nested Loop" in db.plan(sql)
    assert db.rows(sql) == [(5, "name5"), (6, "name6")]


def test_sort_pushdown(db: Session) -> None:
    sql = "SELECT id, name FROM big ORDER BY id DESC LIMIT 3"
    plan = db.plan(sql)
    assert "Sort" not in plan.replace("Pushed Sort", "")
    assert db.rows(sql) == [(99999, "name99999"), (99998, "name99998"), (99997, "name99997")]
    assert db.executes() == ["execute quals=[] columns=id,name sortkeys=[('id', True)] limit=3"]


def test_sort_on_a_column_the_wrapper_cannot_sort_stays_in_postgres(db: Session) -> None:
    plan = db.plan("SELECT id, f FROM echo ORDER BY f DESC")
    assert "Sort Key: echo.f DESC" in plan
    assert db.rows("SELECT id FROM echo ORDER BY f DESC LIMIT 2") == [(19,), (18,)]
    assert db.executes() == ["execute quals=[] columns=f,id sortkeys=[] limit=None"]


def test_limit_is_not_pushed_when_postgres_must_filter(db: Session) -> None:
    assert db.rows("SELECT id FROM echo WHERE id % 2 = 1 LIMIT 2") == [(1,), (3,)]
    assert db.executes()[0].endswith("limit=None")
    assert len(db.rows("SELECT id FROM echo LIMIT 2 OFFSET 5")) == 2
    assert db.executes()[0].endswith("limit=None")
    assert db.rows("SELECT id FROM echo LIMIT 4") == [(0,), (1,), (2,), (3,)]
    assert db.executes()[0].endswith("limit=4")


def test_explain_shows_wrapper_lines_and_verbose_quals(db: Session) -> None:
    plain = "\n".join(r[0] for r in db.conn.execute("EXPLAIN SELECT id FROM echo WHERE id = 4"))
    assert "Wrapper: echo of 20 rows" in plain
    assert "Pushed Quals" not in plain
    verbose = db.plan("SELECT id FROM echo WHERE id = 4 AND name IS NOT NULL")
    assert "Wrapper: columns: id,name" in verbose
    assert "Pushed Quals: name IS NOT NULL, id = 4" in verbose


def test_rel_size_comes_from_the_wrapper(db: Session) -> None:
    assert "rows=100000 " in db.plan("SELECT * FROM big")
    assert "rows=1 " in db.plan("SELECT * FROM big WHERE id = 3")


# --- errors -------------------------------------------------------------------------------


def failing(db: Session, mode: str) -> str:
    name = f"fail_{mode}"
    db.conn.execute(f"CREATE FOREIGN TABLE {name} (x int) SERVER failing OPTIONS (mode '{mode}')")
    return name


def test_python_exception_is_an_error_and_the_backend_survives(db: Session) -> None:
    t = failing(db, "exception")
    pid = db.conn.info.backend_pid
    with pytest.raises(errors.ExternalRoutineException) as e:
        db.rows(f"SELECT * FROM {t}")
    assert e.value.diag.message_primary == "Error in python: ValueError"  # multicorn2's form
    assert e.value.diag.message_detail == "boom from python"
    assert db.conn.info.backend_pid == pid
    assert db.rows("SELECT count(*) FROM echo") == [(20,)]


def test_log_to_postgres_error_carries_hint_and_detail(db: Session) -> None:
    t = failing(db, "pgerror")
    with pytest.raises(errors.FdwError) as e:
        db.rows(f"SELECT * FROM {t}")
    assert e.value.diag.message_primary == "wrapper refuses"
    assert e.value.diag.message_hint == "Try the other thing."
    assert e.value.diag.message_detail == "Why not."


def test_warning_reaches_the_client(db: Session) -> None:
    t = failing(db, "warning")
    assert db.rows(f"SELECT * FROM {t}") == [(1,)]
    assert db.notices == ["just a warning"]


def test_errors_mid_stream_in_init_and_in_rows(db: Session) -> None:
    with pytest.raises(errors.ExternalRoutineException, match="midstream failure"):
        db.rows(f"SELECT * FROM {failing(db, 'midstream')}")
    with pytest.raises(errors.ExternalRoutineException, match="init failure"):
        db.rows(f"SELECT * FROM {failing(db, 'init')}")
    with pytest.raises(
        errors.FdwInvalidDataType, match="a row must be a mapping or a sequence, not int"
    ):
        db.rows(f"SELECT * FROM {failing(db, 'badrow')}")
    with pytest.raises(errors.InvalidTextRepresentation):
        db.rows(f"SELECT * FROM {failing(db, 'badvalue')}")
    assert db.rows("SELECT count(*) FROM echo") == [(20,)]


def test_postgres_error_inside_a_scan_leaks_no_python_references(db: Session) -> None:
    db.conn.execute(
        "CREATE SERVER tracked FOREIGN DATA WRAPPER otelspans_fdw "
        "OPTIONS (wrapper 'host_wrappers.TrackedRows')"
    )
    db.conn.execute("CREATE FOREIGN TABLE tr_bad (x int) SERVER tracked OPTIONS (mode 'bad')")
    db.conn.execute("CREATE FOREIGN TABLE tr_live (x int) SERVER tracked OPTIONS (mode 'live')")
    for _ in range(5):
        with pytest.raises(errors.InvalidTextRepresentation):
            db.rows("SELECT * FROM tr_bad")
    with db.conn.transaction():
        cur = db.conn.cursor(name="half")
        cur.execute("SELECT * FROM tr_bad")
        assert cur.fetchone() == (1,)
        cur.close()  # a scan ended early releases its iterator too
    assert db.rows("SELECT x FROM tr_live") == [(0,)]


def test_traceback_goes_to_the_server_log(db: Session, pg) -> None:
    with pytest.raises(errors.ExternalRoutineException):
        db.rows(f"SELECT * FROM {failing(db, 'exception')}")
    log = pg.server_log()
    assert "Traceback (most recent call last)" in log
    assert 'raise ValueError("boom from python")' in log


def test_statement_timeout_stops_busy_python(db: Session) -> None:
    t = failing(db, "busy")
    db.conn.execute("SET statement_timeout = '500ms'")
    started = time.monotonic()
    with pytest.raises(errors.QueryCanceled):
        db.rows(f"SELECT * FROM {t}")
    assert time.monotonic() - started < 2.5
    db.conn.execute("RESET statement_timeout")
    assert db.rows("SELECT count(*) FROM echo") == [(20,)]


def test_pg_cancel_backend_stops_sleeping_python(db: Session, fresh_dsn: str) -> None:
    t = failing(db, "sleepy")
    pid = db.conn.info.backend_pid

    def cancel() -> None:
        time.sleep(0.7)
        with psycopg.connect(fresh_dsn, autocommit=True) as other:
            other.execute("SELECT pg_cancel_backend(%s)", (pid,))

    th = threading.Thread(target=cancel)
    th.start()
    started = time.monotonic()
    with pytest.raises(errors.QueryCanceled):
        db.rows(f"SELECT * FROM {t}")
    th.join()
    assert time.monotonic() - started < 3.0
    assert db.rows("SELECT 1") == [(1,)]
    assert db.rows("SELECT count(*) FROM echo") == [(20,)]


# --- instance cache and options ----------------------------------------------------------


def test_instance_is_cached_and_rebuilt_when_options_or_columns_change(db: Session) -> None:
    db.conn.execute(
        "CREATE SERVER described FOREIGN DATA WRAPPER otelspans_fdw "
        "OPTIONS (wrapper 'host_wrappers.Described', level 'server', shared 'yes')"
    )
    db.conn.execute(
        "CREATE FOREIGN TABLE descr (options text, columns text, serial int, pid int) "
        "SERVER described OPTIONS (level 'table')"
    )
    q = "SELECT options, columns, serial FROM descr"
    ((opts, cols, serial),) = db.rows(q)
    assert opts == '{"level": "table", "shared": "yes"}'
    assert cols == "options:text,columns:text,serial:integer,pid:integer"
    assert db.rows(q)[0][2] == serial  # reused
    db.conn.execute("ALTER FOREIGN TABLE descr OPTIONS (ADD extra 'x')")
    ((opts, _, serial2),) = db.rows(q)
    assert opts == '{"extra": "x", "level": "table", "shared": "yes"}' and serial2 > serial
    db.conn.execute("ALTER SERVER described OPTIONS (SET shared 'no')")
    ((opts, _, serial3),) = db.rows(q)
    assert '"shared": "no"' in opts and serial3 > serial2
    db.conn.execute("ALTER FOREIGN TABLE descr ADD COLUMN more text")
    ((_, cols, serial4),) = db.rows(q)
    assert cols.endswith(",more:text") and serial4 > serial3


# --- security -----------------------------------------------------------------------------


def test_wrapper_option_is_superuser_only(db: Session, fresh_dsn: str) -> None:
    role = "r_" + uuid.uuid4().hex[:8]
    db.conn.execute(f"CREATE ROLE {role} LOGIN")
    db.conn.execute(f"GRANT USAGE ON FOREIGN DATA WRAPPER otelspans_fdw TO {role}")
    db.conn.execute(f"GRANT USAGE ON FOREIGN SERVER echo TO {role}")
    db.conn.execute(f"GRANT SELECT ON echo TO {role}")
    db.conn.execute(f"GRANT CREATE ON SCHEMA public TO {role}")
    user_dsn = fresh_dsn.replace("user=postgres", f"user={role}")
    with psycopg.connect(user_dsn, autocommit=True) as c:
        with pytest.raises(errors.InsufficientPrivilege) as e:
            c.execute(
                "CREATE SERVER mine FOREIGN DATA WRAPPER otelspans_fdw "
                "OPTIONS (wrapper 'os.system')"
            )
        assert e.value.diag.message_hint == "Ask a superuser to create or alter the server."
        # A server without its class is refused at once (multicorn2's message), so a role
        # cannot make one and have a wrapper added later.
        with pytest.raises(errors.FdwOptionNameNotFound) as e:
            c.execute("CREATE SERVER mine FOREIGN DATA WRAPPER otelspans_fdw")
        assert e.value.diag.message_primary == (
            "The wrapper parameter is mandatory, specify a valid class name"
        )
        assert "superuser" in (e.value.diag.message_hint or "")
        with pytest.raises(errors.FdwInvalidOptionName) as e:
            c.execute("CREATE FOREIGN TABLE t2 (x int) SERVER echo OPTIONS (wrapper 'os.system')")
        assert e.value.diag.message_primary == "Cannot set the wrapper class on the table"
        assert e.value.diag.message_hint == "Set it on the server"
    with pytest.raises(errors.FdwOptionNameNotFound):
        db.conn.execute("ALTER SERVER echo OPTIONS (DROP wrapper)")
        # Ordinary grants are enough to query.
        assert c.execute("SELECT count(*) FROM echo").fetchone() == (20,)


def test_superuser_cannot_give_a_wrapper_without_a_class(db: Session) -> None:
    with pytest.raises(errors.FdwInvalidStringFormat):
        db.conn.execute(
            "CREATE SERVER bad FOREIGN DATA WRAPPER otelspans_fdw OPTIONS (wrapper 'nodots')"
        )


def test_values_round_trip_decimal_and_big_ints(db: Session) -> None:
    rows = db.rows("SELECT n FROM echo WHERE n > 4.5 ORDER BY n")
    assert rows == [(Decimal(i) / 4,) for i in range(19, 20)]
    assert "n|>|Decimal('4.5')|Decimal" in db.executes()[0]
    db.rows("SELECT id FROM echo WHERE id = 9223372036854775807")
    assert "id|=|9223372036854775807|int" in db.executes()[0]


# --- the Python call bridge -----------------------------------------------------------------


def test_otelspans_call_runs_python_with_json_in_and_out(db: Session, fresh_dsn: str) -> None:
    assert db.rows("SELECT otelspans_call('json.loads', '{\"s\": \"[1, 2]\"}')") == [([1, 2],)]
    with pytest.raises(errors.ExternalRoutineException, match="has no attribute 'nope'"):
        db.rows("SELECT otelspans_call('os.nope')")
    with pytest.raises(errors.InvalidParameterValue) as e:
        db.rows("SELECT otelspans_call('nodot')")
    assert e.value.diag.message_hint == "Give it as module.function."
    role = "r_" + uuid.uuid4().hex[:8]
    db.conn.execute(f"CREATE ROLE {role} LOGIN")
    with psycopg.connect(fresh_dsn.replace("user=postgres", f"user={role}")) as c:
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute("SELECT otelspans_call('os.getpid')")


def test_estimates_see_stable_expressions_and_bound_parameters(db: Session) -> None:
    db.conn.execute(
        "CREATE SERVER probe FOREIGN DATA WRAPPER otelspans_fdw "
        "OPTIONS (wrapper 'host_wrappers.SizeProbe')"
    )
    db.conn.execute(f"CREATE FOREIGN TABLE probe ({ECHO_COLUMNS}) SERVER probe")
    assert "rows=1007 " in db.plan("SELECT * FROM probe WHERE ts > now() - interval '1 hour'")
    assert "rows=7 " in db.plan("SELECT * FROM probe WHERE ts > clock_timestamp()")
    db.conn.execute("PREPARE q(int8) AS SELECT * FROM probe WHERE id = $1")
    assert "rows=1007 " in db.plan("EXECUTE q(5)")  # custom plan: the parameter is known
