"""Errors a user can cause carry a SQLSTATE and a HINT (never a bare Python ValueError)."""

from __future__ import annotations

import psycopg
import pytest


@pytest.mark.parametrize(
    ("sql", "sqlstate", "hint"),
    [
        ("SELECT otel_retention('7 days', batch_size => 0)", "22023", "batch_size => 1"),
        ("SELECT otel_retention('-7 days')", "22023", "older_than =>"),
        ("SELECT otel_retention('7 days', grace => '-1 hour')", "22023", "grace =>"),
        ("SELECT otel_publish(batch => 0)", "22023", "batch => 1"),
    ],
)
def test_function_arguments(fresh_dsn: str, sql: str, sqlstate: str, hint: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        c.execute("CREATE EXTENSION otelspans")
        with pytest.raises(psycopg.Error) as e:
            c.execute(sql)
        assert e.value.sqlstate == sqlstate, e.value
        assert hint in (e.value.diag.message_hint or ""), e.value.diag.message_hint


@pytest.mark.parametrize("value", ["abc", "0", "-3"])
def test_numeric_table_options(fresh_dsn: str, value: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        c.execute("CREATE EXTENSION otelspans")
        try:
            c.execute(f"ALTER FOREIGN TABLE otel_spans OPTIONS (ADD rows_per_process '{value}')")
        except psycopg.Error as e:  # refused when set: as good, if it says why
            assert e.sqlstate and e.diag.message_hint, e
            return
        with pytest.raises(psycopg.Error) as e:
            c.execute(
                "SELECT * FROM otel_spans WHERE process_id = '00000000-0000-0000-0000-000000000001'"
            )
        assert e.value.sqlstate == "22023", e.value
        assert "rows_per_process" in str(e.value)
        assert "SET rows_per_process" in (e.value.diag.message_hint or "")
