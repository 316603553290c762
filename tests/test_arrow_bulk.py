"""The bulk path (ext/arrow.c) over real connections: Arrow data from wrappers to tuples.

Wrappers live in tests/wrappers/arrow_wrappers.py; the expected rows are built from the same
functions that build the Arrow data.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
import zoneinfo
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import arrow_wrappers as aw
import psycopg
import pytest
from psycopg import errors

SHAPES = ["table", "reader", "batches", "gen", "structs"]

# PostgreSQL type of each column of the "types" data set.
TYPES_PG = {
    "b": "bool",
    "i8": "int2",
    "i16": "int2",
    "i32": "int4",
    "i64": "int8",
    "u8": "int2",
    "u16": "int4",
    "u32": "int8",
    "f32": "float4",
    "f64": "float8",
    "s": "text",
    "ls": "varchar",
    "ds": "text",
    "ds8": "text",
    "bin": "bytea",
    "lbin": "bytea",
    "fbin": "bytea",
    "u": "uuid",
    "us": "uuid",
    "d": "date",
    "d64": "date",
    "ts_s": "timestamp",
    "ts_ms": "timestamptz",
    "ts_us": "timestamptz",
    "ts_ns": "timestamptz",
    "ts_naive": "timestamp",
    "tm": "time",
    "dec": "numeric",
    "bigdec": "numeric",
    "j": "jsonb",
    "nul": "int4",
}


class Session:
    def __init__(self, dsn: str):
        self.conn = psycopg.connect(dsn, autocommit=True)

    def rows(self, sql: str, params: Any = None) -> list[tuple]:
        return self.conn.execute(sql, params).fetchall()

    def table(self, name: str, columns: str, **options: str) -> str:
        opts = ", ".join(f"{k} '{v}'" for k, v in options.items())
        self.conn.execute(f"CREATE FOREIGN TABLE {name} ({columns}) SERVER arrow OPTIONS ({opts})")
        return name


@pytest.fixture
def db(fresh_dsn: str) -> Iterator[Session]:
    s = Session(fresh_dsn)
    s.conn.execute("CREATE EXTENSION otelspans")
    s.conn.execute(
        "CREATE SERVER arrow FOREIGN DATA WRAPPER otelspans_fdw "
        "OPTIONS (wrapper 'arrow_wrappers.ArrowData')"
    )
    try:
        yield s
    finally:
        s.conn.close()


def types_columns_sql() -> str:
    return ", ".join(f"{name} {typ}" for name, typ in TYPES_PG.items())


def expected_types() -> list[tuple]:
    def pg(name: str, v: Any) -> Any:
        if v is None:
            return None
        if name == "u":
            return uuid.UUID(bytes=v)
        if name == "us":
            return uuid.UUID(v)
        if name == "j":
            return json.loads(v)
        return v

    rows = aw.types_values()[aw.TYPES_SLICE :]
    return [tuple(pg(name, r[name]) for name in TYPES_PG) for r in rows]


# --- every type, every shape --------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_every_type_with_nulls_and_slices(db: Session, shape: str) -> None:
    t = db.table("types", types_columns_sql(), kind="types", shape=shape)
    got = db.rows(f"SELECT {', '.join(TYPES_PG)} FROM {t}")
    want = expected_types()
    assert len(got) == len(want) == aw.N_TYPES - aw.TYPES_SLICE
    for g, w in zip(got, want, strict=True):
        for name, gv, wv in zip(TYPES_PG, g, w, strict=True):
            assert gv == wv, (name, gv, wv)


def test_decimal_and_timestamp_text_keep_scale_and_precision(db: Session) -> None:
    t = db.table("types", types_columns_sql(), kind="types")
    db.conn.execute("SET TimeZone = 'UTC'")
    got = db.rows(f"SELECT dec::text, bigdec::text, ts_ns::text FROM {t}")
    rows = aw.types_values()[aw.TYPES_SLICE :]
    assert [g[0] for g in got] == [None if r["dec"] is None else f"{r['dec']:.2f}" for r in rows]
    assert [g[1] for g in got] == [None if r["bigdec"] is None else str(r["bigdec"]) for r in rows]
    assert all(g[1] is None or len(g[1].split(".")[1]) == 10 for g in got)
    assert got[0][2] == "1969-12-31 23:59:59.500002+00"


def test_only_projected_columns_are_read(db: Session) -> None:
    # `extra` is not in the data and `f64` cannot go to int4: neither matters unless asked for
    t = db.table("partial", "i32 int4, extra text, f64 int4, s text", kind="types")
    got = db.rows(f"SELECT i32, s FROM {t}")
    rows = aw.types_values()[aw.TYPES_SLICE :]
    assert got == [(r["i32"], r["s"]) for r in rows]
    assert db.rows(f"SELECT count(*) FROM {t}") == [(len(rows),)]
    with pytest.raises(errors.FdwColumnNameNotFound) as e:
        db.rows(f"SELECT extra FROM {t}")
    assert e.value.diag.message_primary == 'column "extra" is missing from the Arrow data'
    assert '"i32"' in (e.value.diag.message_detail or "")
    assert "extra" in (e.value.diag.message_hint or "")
    with pytest.raises(errors.FdwInvalidDataType, match='column "f64"'):
        db.rows(f"SELECT f64 FROM {t}")


@pytest.mark.parametrize(
    ("column", "pgtype", "arrow_name", "pg_name"),
    [
        ("i64", "int4", "int64", "integer"),
        ("u32", "int4", "uint32", "integer"),
        ("s", "int8", "string", "bigint"),
        ("f64", "int8", "double", "bigint"),
        ("ts_ms", "date", "timestamp[ms, tz=UTC]", "date"),
        ("b", "text", "bool", "text"),
        ("bin", "uuid", "binary", "uuid"),
        ("fbin", "uuid", "fixed_size_binary[3]", "uuid"),
        ("ds", "int4", "dictionary<values=string, indices=int32>", "integer"),
        ("bigdec", "float8", "decimal128(38, 10)", "double precision"),
        ("d", "timestamptz", "date32", "timestamp with time zone"),
    ],
)
def test_schema_mismatch_names_column_and_both_types(
    db: Session, column: str, pgtype: str, arrow_name: str, pg_name: str
) -> None:
    t = db.table("mm", f"{column} {pgtype}", kind="types")
    with pytest.raises(errors.FdwInvalidDataType) as e:
        db.rows(f"SELECT * FROM {t}")
    assert e.value.diag.message_primary == (
        f'column "{column}" has Arrow type {arrow_name}, which cannot be converted to {pg_name}'
    )
    assert e.value.diag.message_hint
    assert "format string" in (e.value.diag.message_detail or "")


# --- conversions between types -------------------------------------------------------------


def test_integers_widen_and_go_to_float_and_numeric(db: Session) -> None:
    a = db.table(
        "num_a",
        "i8 int2, i16 int4, i32 int8, i64 float8, u32 int8, u64 numeric, f32 float8, "
        "f64 float8, dec numeric(6, 1)",
        kind="numbers",
    )
    assert db.rows(f"SELECT * FROM {a}") == [
        (-5, -300, None, float(2**53), 2**32 - 1, Decimal(2**64 - 1), 1.25, 1e300, Decimal("1.5")),
        (None, 300, -70000, float(-(2**40)), 0, Decimal(1), None, -2.5, Decimal("0.0")),
        (7, None, 70000, None, None, None, -0.5, None, None),
    ]
    b = db.table(
        "num_b",
        "i8 float4, i16 float8, i32 numeric, i64 numeric, u32 float8, u64 float8, "
        "f32 numeric, f64 numeric, dec numeric",
        kind="numbers",
        shape="batches",
    )
    assert db.rows(f"SELECT * FROM {b}") == [
        (
            -5.0,
            -300.0,
            None,
            Decimal(2**53),
            float(2**32 - 1),
            float(2**64 - 1),
            Decimal("1.25"),
            Decimal("1e300"),
            Decimal("1.50"),
        ),
        (
            None,
            300.0,
            Decimal(-70000),
            Decimal(-(2**40)),
            0.0,
            1.0,
            None,
            Decimal("-2.5"),
            Decimal("-0.01"),
        ),
        (7.0, None, Decimal(70000), None, None, None, Decimal("-0.5"), None, None),
    ]
    assert db.rows(f"SELECT dec::text FROM {b}") == [("1.50",), ("-0.01",), (None,)]


def test_strings_through_input_functions(db: Session) -> None:
    t = db.table("inputs", "s bpchar(300), ls varchar(10), j json, us text, ds name", kind="types")
    got = db.rows(f"SELECT s, ls, j::text, us, ds FROM {t}")
    rows = aw.types_values()[aw.TYPES_SLICE :]
    assert [g[0] for g in got] == [None if r["s"] is None else r["s"].ljust(300) for r in rows]
    assert [g[1] for g in got] == [r["ls"] for r in rows]
    assert [g[2] for g in got] == [r["j"] for r in rows]
    assert [g[3] for g in got] == [r["us"] for r in rows]
    assert [g[4] for g in got] == [r["ds"] for r in rows]
    short = db.table("short", "s varchar(40)", kind="types")
    with pytest.raises(errors.StringDataRightTruncation) as e:
        db.rows(f"SELECT s FROM {short}")
    assert 'Arrow column "s"' in (e.value.diag.context or "")


def test_naive_timestamps_to_timestamptz_use_the_session_time_zone(db: Session) -> None:
    t = db.table("naive", "ts_naive timestamptz, ts_ms timestamp", kind="types")
    db.conn.execute("SET TimeZone = 'America/New_York'")
    got = db.rows(f"SELECT ts_naive, ts_ms FROM {t}")
    ny = zoneinfo.ZoneInfo("America/New_York")
    rows = aw.types_values()[aw.TYPES_SLICE :]
    assert [g[0] for g in got] == [
        None if r["ts_naive"] is None else r["ts_naive"].replace(tzinfo=ny) for r in rows
    ]
    # an aware Arrow timestamp to a plain timestamp keeps the UTC wall clock
    assert [g[1] for g in got] == [
        None if r["ts_ms"] is None else r["ts_ms"].replace(tzinfo=None) for r in rows
    ]


def test_time_units_decimal_widths_negative_scales_and_uint64_indices(db: Session) -> None:
    cols = "t32s time, t32ms time, t64ns time, dneg numeric, d32 numeric, d64 numeric, "
    cols += "big numeric, du64 text, fb16 bytea"
    t = db.table("more", cols, kind="more")
    assert db.rows(f"SELECT * FROM {t}") == aw.MORE_EXPECTED
    assert db.rows(f"SELECT dneg::text, d32::text, big::text FROM {t}") == [
        ("12300", "1.234", "-" + "1" + "0" * 35 + "1.0"),
        (None, "-9999.999", "1" + "0" * 36 + ".5"),
        ("-500", None, "-0.5"),
    ]


def test_decimal128_extremes(db: Session) -> None:
    t = db.table("dec38", "m numeric, f numeric", kind="dec38")
    got = db.rows(f"SELECT m::text, f::text FROM {t}")

    def scaled(v: int) -> str:
        digits = str(abs(v)).rjust(38, "0")
        return ("-" if v < 0 else "") + "0." + digits

    assert got == [(str(v), scaled(v)) for v in aw.DEC38_INTS]


def test_chunks_shrink_to_the_byte_budget(db: Session) -> None:
    t = db.table("huge", "i int4, s text", kind="huge")
    n = 200
    assert db.rows(f"SELECT count(*), sum(length(s)), max(i) FROM {t}") == [
        (n, sum(100_000 + i for i in range(n)), n - 1)
    ]
    assert db.rows(f"SELECT i, left(s, 3), length(s) FROM {t} WHERE i IN (0, 199)") == [
        (0, "AAA", 100_000),
        (199, "RRR", 100_199),
    ]


def test_ambiguous_field_names_are_an_error(db: Session) -> None:
    t = db.table("amb", "name text, name2 text", kind="ambiguous")
    assert db.rows(f"SELECT name2 FROM {t}") == [("c",)]
    with pytest.raises(errors.FdwColumnNameNotFound, match="differ only in case"):
        db.rows(f"SELECT name FROM {t}")
    exact = db.table("amb_exact", '"NAME" text', kind="ambiguous")
    assert db.rows(f"SELECT * FROM {exact}") == [("b",)]


def test_a_stream_from_another_producer(db: Session) -> None:
    pytest.importorskip("duckdb")
    t = db.table(
        "duck", "x int8, s text, d numeric, t timestamptz, u uuid, h numeric", kind="duckdb"
    )
    got = db.rows(f"SELECT * FROM {t} ORDER BY x")
    assert len(got) == 5000
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    u = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8")
    for i in (0, 1, 2, 3, 4999):
        h = None if i % 3 == 0 else Decimal(i * 10**19)
        assert got[i] == (
            i,
            f"v{i}",
            Decimal(i / 4).quantize(Decimal("0.001")),
            t0 + dt.timedelta(seconds=i),
            u,
            h,
        )


def test_nanoseconds_floor_to_microseconds(db: Session) -> None:
    t = db.table("nsf", "t timestamptz", kind="ns_floor")
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    assert db.rows(f"SELECT t FROM {t}") == [
        (epoch - dt.timedelta(microseconds=1),),
        (epoch,),
        (epoch - dt.timedelta(microseconds=2),),
        (None,),
    ]


def test_timestamp_out_of_range_is_an_error(db: Session) -> None:
    t = db.table("tso", "t timestamp", kind="ts_overflow")
    with pytest.raises(errors.DatetimeFieldOverflow) as e:
        db.rows(f"SELECT t FROM {t}")
    assert e.value.diag.message_primary == 'timestamp out of range in column "t"'


def test_invalid_json_reports_the_column(db: Session) -> None:
    t = db.table("bj", "j jsonb", kind="bad_json")
    with pytest.raises(errors.InvalidTextRepresentation) as e:
        db.rows(f"SELECT j FROM {t}")
    assert 'Arrow column "j"' in (e.value.diag.context or "")


@pytest.mark.parametrize("kind", ["bad_utf8", "nul_byte", "split_char"])
def test_invalid_utf8_is_rejected(db: Session, kind: str) -> None:
    t = db.table(kind, "s text", kind=kind)
    with pytest.raises(errors.CharacterNotInRepertoire) as e:
        db.rows(f"SELECT s FROM {t}")
    assert 'Arrow column "s"' in (e.value.diag.context or "")
    assert db.rows(f"SELECT count(*) FROM {t}") == [(3,)]  # not projected: not checked


# --- dictionaries, batches, chunks --------------------------------------------------------


@pytest.mark.parametrize("shape", ["table", "batches", "structs"])
def test_dictionary_text_with_null_indices_entries_and_offsets(db: Session, shape: str) -> None:
    t = db.table("dict", "k int4, v text", kind="dict", shape=shape)
    assert db.rows(f"SELECT k, v FROM {t}") == aw.dict_expected()
    j = db.table("dict_json", "k int4, v jsonb", kind="dict", shape=shape)
    with pytest.raises(errors.InvalidTextRepresentation):
        db.rows(f"SELECT v FROM {j}")  # dictionary values go through jsonb_in too


@pytest.mark.parametrize("shape", ["table", "reader", "gen"])
def test_many_rows_across_chunks_and_batches(db: Session, shape: str) -> None:
    t = db.table("many", "id int8, name text, long_text text", kind="many", shape=shape)
    n = 50_000
    texts = ["y" * (i % 300) if i % 10 else None for i in range(n)]
    assert db.rows(
        f"SELECT count(*), sum(id), sum(length(name)), count(long_text), "
        f"sum(length(long_text)), max(name) FROM {t}"
    ) == [
        (
            n,
            n * (n - 1) // 2,
            sum(len(f"name-{i}") for i in range(n)),
            sum(1 for x in texts if x is not None),
            sum(len(x) for x in texts if x is not None),
            max(f"name-{i}" for i in range(n)),
        )
    ]
    # values survive sorting and hashing (1-byte and 4-byte varlena headers alike)
    assert db.rows(
        f"SELECT long_text, count(*) FROM {t} WHERE id < 1000 "
        "GROUP BY long_text ORDER BY length(long_text) DESC NULLS LAST LIMIT 2"
    ) == [("y" * 299, 3), ("y" * 298, 3)]
    assert db.rows(f"SELECT id, name FROM {t} ORDER BY name DESC LIMIT 1") == [(9999, "name-9999")]


@pytest.mark.parametrize("shape", ["table", "reader", "batches", "gen"])
def test_empty_data_and_empty_batches(db: Session, shape: str) -> None:
    e = db.table("empty", "x int8", kind="empty", shape=shape)
    assert db.rows(f"SELECT x FROM {e}") == []
    s = db.table("some_empty", "x int8", kind="some_empty", shape=shape)
    assert db.rows(f"SELECT x FROM {s}") == [(1,), (2,), (3,), (3,)]


def test_batches_with_a_changing_schema_are_resolved_again(db: Session) -> None:
    t = db.table("sc", "a int8, b text", kind="schema_change", shape="batches")
    assert db.rows(f"SELECT a, b FROM {t}") == [(1, "one"), (2, "two")]


def test_field_names_match_case_insensitively(db: Session) -> None:
    t = db.table("mc", "mixedcase int8, other text", kind="mixed_case")
    assert db.rows(f"SELECT * FROM {t}") == [(1, "a"), (2, "b")]


def test_null_struct_slots_are_rows_of_nulls(db: Session) -> None:
    t = db.table("sn", "a int8, s text", kind="struct_nulls")
    assert db.rows(f"SELECT a, s FROM {t}") == [(2, "b"), (None, None), (4, "d")]


def test_rescan_and_joins_read_again(db: Session) -> None:
    t = db.table("dict", "k int4, v text", kind="dict")
    db.conn.execute("CREATE TABLE keys AS SELECT generate_series(1, 9) AS k")
    db.conn.execute("SET enable_hashjoin = off; SET enable_mergejoin = off")
    db.conn.execute("SET enable_material = off")
    got = db.rows(f"SELECT keys.k, d.v FROM keys JOIN {t} d ON d.k = keys.k ORDER BY 1")
    assert got == [(k, v) for k, v in aw.dict_expected()]


# --- errors and resources -----------------------------------------------------------------


def test_stream_error_mid_stream_and_the_backend_survives(db: Session, pg: Any) -> None:
    t = db.table("se", "x int8", kind="stream_error")
    pid = db.conn.info.backend_pid
    with pytest.raises(errors.ExternalRoutineException) as e:
        db.rows(f"SELECT x FROM {t}")
    message = e.value.diag.message_primary or ""
    assert message.startswith("could not read the next Arrow record batch: ")
    assert message.endswith("generator broke mid-stream")  # the traceback goes to the log only
    assert 'raise ValueError("generator broke mid-stream")' in pg.server_log()
    assert db.conn.info.backend_pid == pid
    assert db.rows(f"SELECT count(*) FROM {db.table('ok', 'x int8', kind='some_empty')}") == [(4,)]
    # the rows before the failure were produced (a cursor sees them)
    with db.conn.transaction():
        cur = db.conn.cursor(name="c")
        cur.execute(f"SELECT x FROM {t}")
        assert cur.fetchmany(4) == [(0,), (0,), (1,), (1,)]
        with pytest.raises(errors.ExternalRoutineException):
            cur.fetchone()
        raise psycopg.Rollback()


def test_python_exception_in_a_batch_generator(db: Session) -> None:
    t = db.table("ge", "x int8", kind="gen_error")
    with pytest.raises(errors.ExternalRoutineException) as e:
        db.rows(f"SELECT x FROM {t}")
    assert e.value.diag.message_primary == "Error in python: RuntimeError"
    assert e.value.diag.message_detail == "batch generator broke"
    assert db.rows(f"SELECT count(*) FROM {db.table('ok', 'x int8', kind='some_empty')}") == [(4,)]


def test_non_batches_and_non_struct_arrays_are_errors(db: Session) -> None:
    t = db.table("nb", "x int8", kind="not_batches")
    with pytest.raises(errors.FdwInvalidDataType, match="after Arrow record batches"):
        db.rows(f"SELECT x FROM {t}")
    t = db.table("ns", "x int8", kind="not_struct")
    with pytest.raises(errors.FdwInvalidDataType, match="Arrow data of type int64 cannot"):
        db.rows(f"SELECT x FROM {t}")


def test_streams_are_released_on_error_early_end_and_limit(db: Session) -> None:
    t = db.table("tracked", "x int8, s text", kind="tracked", batches="5")
    live = db.table("live", "n int8", kind="live")
    for _ in range(3):
        with pytest.raises(errors.InvalidTextRepresentation):
            db.rows(f"SELECT x FROM {t} WHERE s::int >= 0")  # fails at row 1500
    assert db.rows(f"SELECT n FROM {live}") == [(0,)]
    assert db.rows(f"SELECT x FROM {t} LIMIT 3") == [(0,), (1,), (2,)]
    assert db.rows(f"SELECT n FROM {live}") == [(0,)]
    with db.conn.transaction():
        cur = db.conn.cursor(name="half")
        cur.execute(f"SELECT x FROM {t}")
        assert cur.fetchone() == (0,)
        cur.close()
    assert db.rows(f"SELECT n FROM {live}") == [(0,)]
    assert db.rows(f"SELECT count(*), sum(x) FROM {t}") == [(5000, 4999 * 5000 // 2)]
    assert db.rows(f"SELECT n FROM {live}") == [(0,)]


def test_statement_timeout_stops_a_slow_stream(db: Session) -> None:
    t = db.table("slow", "x int8", kind="slow")
    db.conn.execute("SET statement_timeout = '1s'")
    start = time.monotonic()
    with pytest.raises(errors.QueryCanceled):
        db.rows(f"SELECT count(*) FROM {t}")
    assert time.monotonic() - start < 5
    db.conn.execute("RESET statement_timeout")
    assert db.rows(f"SELECT count(*) FROM {db.table('ok', 'x int8', kind='some_empty')}") == [(4,)]


def test_text_in_a_latin1_database(pg: Any) -> None:
    name = "latin1_" + uuid.uuid4().hex[:8]
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute(
            f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
            "TEMPLATE template0"
        )
    try:
        s = Session(pg.dsn(name))
        s.conn.execute("CREATE EXTENSION otelspans")
        s.conn.execute(
            "CREATE SERVER arrow FOREIGN DATA WRAPPER otelspans_fdw "
            "OPTIONS (wrapper 'arrow_wrappers.ArrowData')"
        )
        t = s.table("d", "k int4, v text", kind="dict")
        assert s.rows(f"SELECT k, v FROM {t}") == aw.dict_expected()
        t = s.table("types", "ls text, s text", kind="types")
        rows = aw.types_values()[aw.TYPES_SLICE :]
        assert s.rows(f"SELECT ls FROM {t}") == [(r["ls"],) for r in rows]
        with pytest.raises(errors.UntranslatableCharacter):
            s.rows(f"SELECT s FROM {t}")  # the euro sign has no LATIN1 code
        s.conn.close()
    finally:
        with psycopg.connect(pg.dsn(), autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
