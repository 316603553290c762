"""Wrappers written for multicorn2 (``import multicorn``, nothing else) on our host.

The writable API in transactions with savepoints and rollbacks, the transaction hooks in
PostgreSQL's order, IMPORT FOREIGN SCHEMA, and the qual, sort, row and log forms multicorn2
gives.  The wrappers are in tests/wrappers/mc_wrappers.py; they log what they see.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from psycopg import errors

from otelspans_fdw import multicorn_api


class Session:
    def __init__(self, dsn: str):
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.log: list[str] = []
        self.conn.add_notice_handler(lambda d: self.log.append(d.message_primary or ""))

    def run(self, sql: str, params: object = None) -> list[tuple]:
        cur = self.conn.execute(sql, params)
        return cur.fetchall() if cur.description else []

    def hooks(self) -> list[str]:
        out, self.log = self.log, []
        return [m for m in out if m.endswith(")") and "(" in m and " " not in m]


@pytest.fixture
def s(fresh_dsn: str) -> Iterator[Session]:
    sess = Session(fresh_dsn)
    sess.run("CREATE EXTENSION otelspans")
    sess.run(
        "CREATE SERVER store FOREIGN DATA WRAPPER otelspans_fdw"
        " OPTIONS (wrapper 'mc_wrappers.Store')"
    )
    sess.run(
        "CREATE FOREIGN TABLE kv (id int, name text, note text) SERVER store"
        f" OPTIONS (name '{fresh_dsn[-12:]}')"
    )
    yield sess
    sess.conn.close()


def test_insert_update_delete_with_returning(s: Session) -> None:
    assert s.run("INSERT INTO kv (name) VALUES ('a'), ('b') RETURNING id, name") == [
        (1, "a"),
        (2, "b"),
    ]
    assert s.run("UPDATE kv SET name = 'B' WHERE id = 2 RETURNING id, name, note") == [
        (2, "B", "updated from 2")
    ]
    assert s.run("DELETE FROM kv WHERE name = 'a' RETURNING id, name, note") == [(1, "a", None)]
    assert s.run("SELECT id, name, note FROM kv") == [(2, "B", "updated from 2")]


def test_hooks_in_order_and_rollbacks_undo(s: Session) -> None:
    s.run("SELECT * FROM kv")
    assert s.hooks() == ["begin(False)", "end_scan()", "pre_commit()", "commit()"]
    with pytest.raises(errors.UniqueViolation):
        with s.conn.transaction():
            s.run("INSERT INTO kv (id, name) VALUES (7, 'x')")
            s.run("CREATE TEMP TABLE u (i int PRIMARY KEY); INSERT INTO u VALUES (1), (1)")
    assert s.run("SELECT id FROM kv") == []
    assert "rollback()" in s.hooks()
    s.run("BEGIN ISOLATION LEVEL SERIALIZABLE")
    s.run("INSERT INTO kv (id, name) VALUES (1, 'kept')")
    s.run("COMMIT")
    assert s.hooks() == ["begin(True)", "end_modify()", "pre_commit()", "commit()"]
    assert s.run("SELECT id, name FROM kv") == [(1, "kept")]


def test_savepoints(s: Session) -> None:
    s.run("BEGIN")
    s.run("INSERT INTO kv (id, name) VALUES (1, 'a')")
    s.run("SAVEPOINT one")
    s.run("INSERT INTO kv (id, name) VALUES (2, 'b')")
    s.run("SAVEPOINT two")
    s.run("DELETE FROM kv WHERE id = 1")
    s.run("ROLLBACK TO SAVEPOINT two")
    s.run("RELEASE SAVEPOINT two")
    s.run("ROLLBACK TO SAVEPOINT one")
    s.run("INSERT INTO kv (id, name) VALUES (3, 'c')")
    s.run("RELEASE SAVEPOINT one")
    assert s.run("SELECT id FROM kv ORDER BY id") == [(1,), (3,)]
    s.run("COMMIT")
    assert [h for h in s.hooks() if not h.startswith("end_")] == [
        "begin(False)",
        "sub_begin(2)",
        "sub_begin(3)",
        "sub_rollback(3)",
        "sub_rollback(2)",
        "sub_begin(2)",
        "sub_commit(2)",
        "pre_commit()",
        "commit()",
    ]
    assert s.run("SELECT id, name FROM kv ORDER BY id") == [(1, "a"), (3, "c")]
    # An error inside a savepoint rolls back only that savepoint's changes.
    s.run("BEGIN")
    s.run("SAVEPOINT p")
    s.run("INSERT INTO kv (id, name) VALUES (9, 'gone')")
    with pytest.raises(errors.DivisionByZero):
        s.run("UPDATE kv SET name = (1/0)::text WHERE id = 1")
    s.run("ROLLBACK TO SAVEPOINT p")
    s.run("COMMIT")
    assert s.run("SELECT id FROM kv ORDER BY id") == [(1,), (3,)]


def test_failing_pre_commit_aborts_the_commit(s: Session) -> None:
    s.run("ALTER FOREIGN TABLE kv OPTIONS (ADD fail 'pre_commit')")
    s.run("BEGIN")
    s.run("INSERT INTO kv (id, name) VALUES (1, 'a')")
    with pytest.raises(psycopg.Error) as ei:
        s.run("COMMIT")
    assert ei.value.diag.message_primary == "pre_commit() refused"
    assert ei.value.diag.message_hint == "the test asked for it"
    assert "rollback()" in s.hooks()
    s.run("ALTER FOREIGN TABLE kv OPTIONS (DROP fail)")
    assert s.run("SELECT id FROM kv") == []


def test_bulk_insert_in_batches(s: Session) -> None:
    s.run("ALTER FOREIGN TABLE kv OPTIONS (ADD batch '3')")
    s.run("INSERT INTO kv (id, name) SELECT i, 'n' || i FROM generate_series(1, 7) i")
    assert [h for h in s.hooks() if h.startswith("bulk")] == [
        "bulk_insert(3)",
        "bulk_insert(3)",
        "bulk_insert(1)",
    ]
    # RETURNING needs each row back: one insert() per row.
    assert s.run("INSERT INTO kv (name) VALUES ('r') RETURNING id") == [(8,)]
    assert s.run("SELECT count(*) FROM kv") == [(8,)]
    # An AFTER ROW trigger still batches (as multicorn2) and sees the rows as stored.
    s.run(
        "CREATE FUNCTION seen() RETURNS trigger LANGUAGE plpgsql AS"
        " $$BEGIN RAISE NOTICE 'stored %', NEW.id; RETURN NEW; END$$;"
        "CREATE TRIGGER t AFTER INSERT ON kv FOR EACH ROW EXECUTE FUNCTION seen()"
    )
    s.log.clear()
    s.run("INSERT INTO kv (name) VALUES ('x'), ('y')")
    assert "bulk_insert(2)" in s.log
    assert [m for m in s.log if m.startswith("stored")] == ["stored 9", "stored 10"]


def test_without_a_rowid_column_update_is_refused(s: Session) -> None:
    s.run("CREATE FOREIGN TABLE noid (name text) SERVER store")
    with pytest.raises(psycopg.Error) as ei:
        s.run("UPDATE noid SET name = 'x'")
    assert ei.value.diag.message_primary == "The rowid attribute does not exist"
    assert ei.value.diag.message_hint


def test_import_foreign_schema(s: Session) -> None:
    s.run(
        "CREATE SERVER imp FOREIGN DATA WRAPPER otelspans_fdw"
        " OPTIONS (wrapper 'mc_wrappers.Importer', color 'blue')"
    )
    s.run("CREATE SCHEMA a; CREATE SCHEMA b; CREATE SCHEMA c")
    s.run("IMPORT FOREIGN SCHEMA remote FROM SERVER imp INTO a OPTIONS (extra 'x')")
    s.run("IMPORT FOREIGN SCHEMA remote LIMIT TO (t2) FROM SERVER imp INTO b")
    s.run("IMPORT FOREIGN SCHEMA remote EXCEPT (t1, t3) FROM SERVER imp INTO c")
    tables = s.run(
        "SELECT n.nspname, c.relname, array_to_string(f.ftoptions, ',')"
        " FROM pg_foreign_table f JOIN pg_class c ON c.oid = f.ftrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname IN ('a', 'b', 'c') ORDER BY 1, 2"
    )
    assert tables == [
        ("a", "t1", "extra=x,schema=remote"),
        ("a", "t2", "extra=x,schema=remote"),
        ("a", "t3", "extra=x,schema=remote"),
        ("b", "t2", "schema=remote"),
        ("c", "t2", "schema=remote"),
    ]
    cols = s.run(
        "SELECT attname, format_type(atttypid, atttypmod), array_to_string(attfdwoptions, ',')"
        " FROM pg_attribute WHERE attrelid = 'b.t2'::regclass AND attnum > 0 ORDER BY attnum"
    )
    assert cols == [("id", "integer", None), ("label", "character varying(20)", "k=v")]
    with pytest.raises(psycopg.Error) as ei:
        s.run("IMPORT FOREIGN SCHEMA remote FROM SERVER store INTO c")
    assert ei.value.diag.message_primary == "Error in python: NotImplementedError"
    assert ei.value.diag.message_detail == "This FDW does not support IMPORT FOREIGN SCHEMA"


def test_quals_sort_keys_rows_and_logs_as_multicorn2(s: Session) -> None:
    s.run(
        "CREATE SERVER rep FOREIGN DATA WRAPPER otelspans_fdw"
        " OPTIONS (wrapper 'mc_wrappers.Reporter')"
    )
    s.run("CREATE FOREIGN TABLE rep (id int, name text, flag bool) SERVER rep")
    s.log.clear()
    rows = s.run(
        "SELECT id FROM rep WHERE name = 'n1' AND id IN (1, 2) AND name <> ALL(ARRAY['x'])"
    )
    assert rows == [(1,)]  # None rows skipped; PostgreSQL applied the quals
    assert s.log[0].startswith("[") and sorted(s.log[0].strip("[]").split(", ")) == sorted(
        ["id = ANY([1", "2])", "name = n1", "name <> ALL(['x'])"]
    )
    for where, text in [
        ("flag", "[flag = True]"),
        ("NOT flag", "[flag <> True]"),
        ("flag IS TRUE", "[flag IS True]"),
        ("flag IS NOT FALSE", "[flag IS NOT False]"),
        ("flag IS UNKNOWN", "[flag IS None]"),
        ("flag IS NOT UNKNOWN", "[flag IS NOT None]"),
    ]:
        s.log.clear()
        got = s.run(f"SELECT id FROM rep WHERE {where}")
        assert s.log[0] == text, where
        want = {"flag": [0, 2], "NOT flag": [1], "flag IS TRUE": [0, 2]}.get(where)
        if want is not None:
            assert [r[0] for r in got] == want
    s.log.clear()
    s.run("SELECT id FROM rep ORDER BY name")
    key = "SortKey(attname='name', attnum=2, is_reversed=False, nulls_first=False, collate=None)"
    assert key in s.log
    s.log.clear()
    s.run('SELECT id FROM rep ORDER BY name COLLATE "C" DESC')
    assert any("collate='C'" in m and "is_reversed=True" in m for m in s.log), s.log


def test_api_names_of_multicorn2() -> None:
    """The names a multicorn2 wrapper imports, and the SQL TableDefinition writes."""
    for name in ("TableDefinition", "ColumnDefinition", "TransactionAwareForeignDataWrapper"):
        assert name in multicorn_api.__all__
    t = multicorn_api.TableDefinition(
        "t",
        columns=[multicorn_api.ColumnDefinition('we"ird', type_name="text", options={"a": "b'c"})],
        options={"x": "1"},
    )
    assert t.to_statement("s", "srv") == (
        'CREATE FOREIGN TABLE "s"."t" (\n"we""ird" text OPTIONS ( a \'b\'\'c\' )\n \n'
        " ) SERVER \"srv\" \n OPTIONS (\nx '1'\n)"
    )
    w = multicorn_api.TransactionAwareForeignDataWrapper({}, {})
    w.insert({"a": 1})
    w.delete(3)
    assert w.current_transaction_state == [("insert", {"a": 1}), ("delete", 3)]
    w.rollback()
    assert w.current_transaction_state == []
    q = multicorn_api.Qual("c", ("=", True), [1, "a"])
    assert repr(q) == "c = ANY([1, 'a'])" and q.list_any_or_all == multicorn_api.ANY


@pytest.fixture
def shapes(s: Session) -> Session:
    s.run("CREATE EXTENSION hstore")
    s.run(
        "CREATE SERVER shapes FOREIGN DATA WRAPPER otelspans_fdw"
        " OPTIONS (wrapper 'mc_wrappers.Shapes')"
    )
    s.run("CREATE FOREIGN TABLE sh (id int, name text, h hstore, grid int[]) SERVER shapes")
    return s


def test_dicts_into_hstore_and_nested_lists_into_2d_arrays(shapes: Session) -> None:
    rows = shapes.run(
        "SELECT id, h -> 'a', h -> 'b', h -> 'q\"', grid, array_dims(grid) FROM sh ORDER BY id"
    )
    assert rows[1] == (1, "1", None, "x\\y", [[1, 2], [3, None]], "[1:2][1:2]")
    shapes.run("CREATE FOREIGN TABLE bad (grid int[]) SERVER shapes OPTIONS (ragged 'true')")
    with pytest.raises(errors.ArraySubscriptError) as ei:
        shapes.run("SELECT grid FROM bad")
    assert "matching dimensions" in (ei.value.diag.message_primary or "")


def test_startup_cost_and_multicorn2_cost_formula_choose_the_join(shapes: Session) -> None:
    """startup = _startup_cost, total = rows * width (as multicorn2; never below the
    startup): a cheap startup makes a parameterized nested
    loop (one wrapper call per outer row) win; an expensive one, a single scan and a hash."""
    shapes.run("CREATE TABLE outer_ids AS SELECT i AS id FROM generate_series(1, 50) i")
    shapes.run("ANALYZE outer_ids")
    sql = "EXPLAIN SELECT * FROM outer_ids o JOIN sh USING (id)"
    plan = "\n".join(r[0] for r in shapes.run(sql))
    assert "Nested Loop" in plan and "cost=20.00" in plan, plan
    shapes.run("ALTER SERVER shapes OPTIONS (ADD startup '100000')")
    plan = "\n".join(r[0] for r in shapes.run(sql))
    assert "Hash Join" in plan and "cost=100000.00..100000.00" in plan, plan


def test_partial_sort_is_pushed_and_postgresql_finishes_it(shapes: Session) -> None:
    shapes.run("ALTER SERVER shapes OPTIONS (ADD rows '6')")
    sql = "SELECT name, id FROM sh ORDER BY name, id DESC"
    plan = "\n".join(r[0] for r in shapes.run("EXPLAIN " + sql))
    assert "Incremental Sort" in plan and "Presorted Key: name" in plan, plan
    assert shapes.run(sql) == [("n0", 4), ("n0", 2), ("n0", 0), ("n1", 5), ("n1", 3), ("n1", 1)]
