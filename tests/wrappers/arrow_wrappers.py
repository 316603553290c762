"""Multicorn2-API wrappers that return Arrow data, for the host's bulk path (no otel code).

``ArrowData`` returns one of the data sets below (the ``kind`` table option) in one of several
shapes (the ``shape`` option): a pyarrow Table (read through ``__arrow_c_stream__``), a
RecordBatchReader, a list or a generator of RecordBatches, or a list of StructArrays (read
through ``__arrow_c_array__``, with the struct's own offset when sliced).  Tests build the
expected rows from the same functions.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pyarrow as pa

try:
    from multicorn import ForeignDataWrapper
except ImportError:
    from otelspans_fdw.multicorn_api import ForeignDataWrapper

NS = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8")
T0 = dt.datetime(2024, 1, 1, 12, 0, 0)
N_TYPES = 11  # rows of the "types" data set before slicing
TYPES_SLICE = 2  # the data set is sliced: rows TYPES_SLICE..N_TYPES-1 are returned


def _null(i: int, k: int) -> bool:
    """Column k is NULL in row i on a staggered pattern (every column has NULLs)."""
    return (i + k) % 4 == 0


def types_columns() -> list[tuple[str, pa.DataType, Any]]:
    """(name, Arrow type, value function of the row number) of every column of "types"."""

    def ts(i: int) -> dt.datetime:
        return T0 + dt.timedelta(days=i, seconds=i, microseconds=i * 1001)

    return [
        ("b", pa.bool_(), lambda i: i % 3 == 0),
        ("i8", pa.int8(), lambda i: -100 + i * 7),
        ("i16", pa.int16(), lambda i: -30000 + i * 1000),
        ("i32", pa.int32(), lambda i: -(2**31) + i),
        ("i64", pa.int64(), lambda i: 2**62 + i),
        ("u8", pa.uint8(), lambda i: 200 + i),
        ("u16", pa.uint16(), lambda i: 60000 + i),
        ("u32", pa.uint32(), lambda i: 2**32 - 1 - i),
        ("f32", pa.float32(), lambda i: i * 0.5 - 1),
        ("f64", pa.float64(), lambda i: i / 3),
        ("s", pa.string(), lambda i: f"text {i} é€😀" * (i % 3) + ("x" * 200 if i == 5 else "")),
        ("ls", pa.large_string(), lambda i: f"large {i}"),
        ("ds", pa.dictionary(pa.int32(), pa.string()), lambda i: ["red", "green", "blue"][i % 3]),
        ("ds8", pa.dictionary(pa.int8(), pa.large_string()), lambda i: f"d{i % 2}"),
        ("bin", pa.binary(), lambda i: bytes([i, 0, 255]) * (i % 3)),
        ("lbin", pa.large_binary(), lambda i: bytes(range(i))),
        ("fbin", pa.binary(3), lambda i: bytes([i, i + 1, i + 2])),
        ("u", pa.binary(16), lambda i: uuid.uuid5(NS, str(i)).bytes),
        ("us", pa.string(), lambda i: str(uuid.uuid5(NS, str(i)))),
        ("d", pa.date32(), lambda i: dt.date(1969, 12, 25) + dt.timedelta(days=i * 100)),
        ("d64", pa.date64(), lambda i: dt.date(2024, 2, 28) + dt.timedelta(days=i)),
        ("ts_s", pa.timestamp("s"), lambda i: ts(i).replace(microsecond=0)),
        (
            "ts_ms",
            pa.timestamp("ms", tz="UTC"),
            lambda i: ts(i).replace(microsecond=(i * 1000) % 1000000, tzinfo=dt.UTC),
        ),
        ("ts_us", pa.timestamp("us", tz="Europe/Paris"), lambda i: ts(i).replace(tzinfo=dt.UTC)),
        (
            "ts_ns",
            pa.timestamp("ns", tz="+02:00"),
            lambda i: (
                dt.datetime(1969, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
                + dt.timedelta(microseconds=i * 250001)
            ),
        ),
        ("ts_naive", pa.timestamp("us"), lambda i: ts(i)),
        ("tm", pa.time64("us"), lambda i: dt.time(i, i, i, i)),
        ("dec", pa.decimal128(10, 2), lambda i: Decimal(i * 1234 - 5000) / 100),
        (
            "bigdec",
            pa.decimal128(38, 10),
            lambda i: Decimal(f"{'-' if i % 2 else ''}{i}2345678901234567890.123456789{i % 10}"),
        ),
        ("j", pa.string(), lambda i: f'{{"i": {i}, "a": [1, "two", null]}}'),
        ("nul", pa.null(), lambda i: None),
    ]


def types_values() -> list[dict[str, Any]]:
    """The Python values of every row (before slicing); NULLs as None."""
    rows = []
    for i in range(N_TYPES):
        row = {}
        for k, (name, _, fn) in enumerate(types_columns()):
            row[name] = None if _null(i, k) else fn(i)
        rows.append(row)
    return rows


def types_table() -> pa.Table:
    schema = pa.schema([(name, typ) for name, typ, _ in types_columns()])
    return pa.Table.from_pylist(types_values(), schema=schema)


def _sliced_batches(table: pa.Table, start: int, size: int) -> list[pa.RecordBatch]:
    """Batches of `size` rows of table[start:], each a slice (non-zero offsets)."""
    return table.combine_chunks().slice(start).to_batches(max_chunksize=size)


def dict_batches() -> list[pa.RecordBatch]:
    """Dictionary text with NULL indices, NULL dictionary entries and sliced dictionaries."""
    dictionary = pa.array(["zero", "one", None, "three", "four"]).slice(1)  # offset 1
    indices = pa.array([0, 1, None, 2, 3, 0, 1], type=pa.int16())
    arr = pa.DictionaryArray.from_arrays(indices, dictionary)
    b1 = pa.record_batch({"k": pa.array(range(7), pa.int32()), "v": arr})
    b2 = pa.record_batch(
        {
            "k": pa.array(range(7, 10), pa.int32()),
            "v": pa.DictionaryArray.from_arrays(
                pa.array([2, 1, 0], type=pa.int16()), pa.array(["x", "y", "z"])
            ),
        }
    )
    return [b1.slice(1), b2]


def dict_expected() -> list[tuple[int, str | None]]:
    return [
        (1, None),  # index 1 -> a NULL dictionary entry
        (2, None),  # a NULL index
        (3, "three"),
        (4, "four"),
        (5, "one"),
        (6, None),
        (7, "z"),
        (8, "y"),
        (9, "x"),
    ]


def many_batches(n: int = 50_000, size: int = 7_777) -> list[pa.RecordBatch]:
    """n rows over several batches (chunk and batch boundaries inside)."""
    ids = pa.array(range(n), pa.int64())
    names = pa.array([f"name-{i}" for i in range(n)])
    long_text = pa.array(["y" * (i % 300) if i % 10 else None for i in range(n)], pa.large_string())
    table = pa.table({"id": ids, "name": names, "long_text": long_text})
    return table.to_batches(max_chunksize=size)


def invalid_utf8_batch(kind: str) -> pa.RecordBatch:
    """A string column whose bytes are not valid UTF-8 (built without validation)."""
    values = {
        "bad_utf8": [b"fine", b"bad \xc3\x28 byte", b"also fine"],
        "nul_byte": [b"fine", b"nul \x00 inside", b"fine"],
        # each string alone is invalid, but the concatenation is valid UTF-8
        "split_char": [b"ok", b"caf\xc3", b"\xa9 split"],
    }[kind]
    data = b"".join(values)
    offsets = [0]
    for v in values:
        offsets.append(offsets[-1] + len(v))
    arr = pa.Array.from_buffers(
        pa.string(),
        len(values),
        [None, pa.py_buffer(pa.array(offsets, pa.int32()).buffers()[1]), pa.py_buffer(data)],
    )
    return pa.record_batch({"s": arr})


def struct_nulls() -> list[pa.StructArray]:
    """A struct array with NULL rows, sliced (the struct itself has an offset)."""
    a = pa.array([1, 2, 3, 4, 5], pa.int64())
    s = pa.array(["a", "b", "c", "d", "e"])
    mask = pa.array([False, False, True, False, False])
    return [pa.StructArray.from_arrays([a, s], names=["a", "s"], mask=mask).slice(1, 3)]


def more_batch() -> pa.RecordBatch:
    """Less common layouts: time32/time64 units, decimal32/64, negative scales, uint64 indices."""
    return pa.record_batch(
        {
            "t32s": pa.array([0, 86399, None], pa.time32("s")),
            "t32ms": pa.array([1, None, 86_399_999], pa.time32("ms")),
            "t64ns": pa.array([None, 1_999, 86_399_999_999_999], pa.time64("ns")),
            "dneg": pa.array([Decimal("12300"), None, Decimal("-500")], pa.decimal128(5, -2)),
            "d32": pa.array([Decimal("1.234"), Decimal("-9999.999"), None], pa.decimal32(7, 3)),
            "d64": pa.array(
                [None, Decimal("12345678901.2345"), Decimal("0.0001")], pa.decimal64(15, 4)
            ),
            "big": pa.array(
                [Decimal(-(10**36) - 1), Decimal(f"{10**36}.5"), Decimal("-0.5")],
                pa.decimal128(38, 1),
            ),
            "du64": pa.DictionaryArray.from_arrays(
                pa.array([1, 0, None], pa.uint64()), pa.array(["zero", "one"])
            ),
            "fb16": pa.array([b"0123456789abcdef", None, b"\x00" * 16], pa.binary(16)),
        }
    )


MORE_EXPECTED = [
    (
        dt.time(0, 0),
        dt.time(0, 0, 0, 1000),
        None,
        Decimal("12300"),
        Decimal("1.234"),
        None,
        Decimal(-(10**36) - 1),
        "one",
        b"0123456789abcdef",
    ),
    (
        dt.time(23, 59, 59),
        None,
        dt.time(0, 0, 0, 1),
        None,
        Decimal("-9999.999"),
        Decimal("12345678901.2345"),
        Decimal(f"{10**36}.5"),
        "zero",
        None,
    ),
    (
        None,
        dt.time(23, 59, 59, 999000),
        dt.time(23, 59, 59, 999999),
        Decimal("-500"),
        None,
        Decimal("0.0001"),
        Decimal("-0.5"),
        None,
        b"\x00" * 16,
    ),
]

# Unscaled decimal128 values around the int64 fast path and the 38-digit limits.
DEC38_INTS = [10**38 - 1, -(10**38 - 1), 0, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 7]

# Objects a returned Arrow stream depends on (a duckdb connection).
_KEEP: dict[str, Any] = {}


def _stream_failing(after: int) -> pa.RecordBatchReader:
    schema = pa.schema([("x", pa.int64())])

    def gen() -> Iterator[pa.RecordBatch]:
        for i in range(after):
            yield pa.record_batch({"x": pa.array([i, i], pa.int64())})
        raise ValueError("generator broke mid-stream")

    return pa.RecordBatchReader.from_batches(schema, gen())


# Producers that are alive (created and not yet released) in this backend.
LIVE = {"count": 0}


def _tracked_reader(n_batches: int) -> pa.RecordBatchReader:
    schema = pa.schema([("x", pa.int64()), ("s", pa.string())])

    def gen() -> Iterator[pa.RecordBatch]:
        LIVE["count"] += 1
        try:
            for b in range(n_batches):
                yield pa.record_batch(
                    {
                        "x": pa.array(range(b * 1000, b * 1000 + 1000), pa.int64()),
                        "s": pa.array(
                            [
                                str(v) if v != 1500 else "oops"
                                for v in range(b * 1000, b * 1000 + 1000)
                            ]
                        ),
                    }
                )
        finally:
            LIVE["count"] -= 1

    return pa.RecordBatchReader.from_batches(schema, gen())


def _shape(batches: list[Any], shape: str, schema: pa.Schema | None = None) -> Any:
    if shape == "table":
        if schema is None:
            schema = batches[0].schema
        return pa.Table.from_batches(batches, schema=schema)
    if shape == "reader":
        return pa.RecordBatchReader.from_batches(schema or batches[0].schema, iter(batches))
    if shape == "batches":
        return list(batches)
    if shape == "gen":
        return (b for b in batches)
    if shape == "structs":
        return [pa.StructArray.from_arrays(b.columns, names=b.schema.names) for b in batches]
    raise ValueError(f"unknown shape {shape}")


class ArrowData(ForeignDataWrapper):
    """Returns the data set named by the ``kind`` option, in the ``shape`` option's form."""

    def __init__(self, options: dict[str, str], columns: dict[str, Any]):
        super().__init__(options, columns)
        self.kind = options.get("kind", "types")
        self.shape = options.get("shape", "table")

    def execute(self, quals, columns, sortkeys=None, limit=None, offset=None) -> Any:
        kind, shape = self.kind, self.shape
        if kind == "types":
            if shape == "structs":
                # a struct array sliced as a whole: offsets on the struct, not the children
                t = types_table().combine_chunks()
                s = pa.StructArray.from_arrays(
                    [c.chunk(0) for c in t.columns], names=t.schema.names
                )
                return [s.slice(TYPES_SLICE, 4), s.slice(TYPES_SLICE + 4)]
            return _shape(_sliced_batches(types_table(), TYPES_SLICE, 4), shape)
        if kind == "dict":
            return _shape(dict_batches(), shape)
        if kind == "many":
            return _shape(many_batches(), shape)
        if kind == "empty":
            schema = pa.schema([("x", pa.int64())])
            if shape == "table":
                return schema.empty_table()
            return _shape([pa.record_batch({"x": pa.array([], pa.int64())})] * 2, shape)
        if kind == "some_empty":
            empty = pa.record_batch({"x": pa.array([], pa.int64())})
            full = pa.record_batch({"x": pa.array([1, 2, 3], pa.int64())})
            return _shape([empty, full, empty, empty, full.slice(2), empty], shape)
        if kind == "schema_change":
            b1 = pa.record_batch({"a": pa.array([1], pa.int64()), "b": pa.array(["one"])})
            b2 = pa.record_batch(
                {"b": pa.array(["two"]), "x": pa.array([0.5]), "a": pa.array([2], pa.int32())}
            )
            return _shape([b1, b2], shape)
        if kind == "mixed_case":
            return _shape([pa.record_batch({"MixedCase": [1, 2], "Other": ["a", "b"]})], shape)
        if kind in ("bad_utf8", "nul_byte", "split_char"):
            return _shape([invalid_utf8_batch(kind)], shape)
        if kind == "struct_nulls":
            return struct_nulls()
        if kind == "ts_overflow":
            return _shape([pa.record_batch({"t": pa.array([0, 2**62], pa.timestamp("s"))})], shape)
        if kind == "more":
            return _shape([more_batch()], shape)
        if kind == "dec38":
            return _shape(
                [
                    pa.record_batch(
                        {
                            "m": pa.array([Decimal(v) for v in DEC38_INTS], pa.decimal128(38, 0)),
                            "f": pa.array(
                                [Decimal(f"{v}E-38") for v in DEC38_INTS], pa.decimal128(38, 38)
                            ),
                        }
                    )
                ],
                shape,
            )
        if kind == "huge":
            # 20 MiB of strings in one batch: chunks shrink to stay under the byte budget
            n = 200
            big = pa.array([chr(65 + i % 26) * (100_000 + i) for i in range(n)], pa.large_string())
            return _shape([pa.record_batch({"i": pa.array(range(n), pa.int32()), "s": big})], shape)
        if kind == "ambiguous":
            return _shape([pa.record_batch({"Name": ["a"], "NAME": ["b"], "name2": ["c"]})], shape)
        if kind == "duckdb":
            import duckdb

            con = duckdb.connect(config={"threads": 1})
            _KEEP["duckdb"] = con
            return con.sql(
                "SELECT i::BIGINT AS x, 'v' || i AS s, (i / 4)::DECIMAL(18, 3) AS d, "
                "TIMESTAMPTZ '2024-01-01 00:00:00+00' + i * INTERVAL 1 SECOND AS t, "
                "'6ba7b810-9dad-11d1-80b4-00c04fd430c8' AS u, "
                "CASE WHEN i % 3 = 0 THEN NULL ELSE i::HUGEINT * 10000000000000000000 END AS h "
                "FROM range(5000) t(i)"
            )
        if kind == "ns_floor":
            return _shape(
                [pa.record_batch({"t": pa.array([-1, 1, -1001, None], pa.timestamp("ns", "UTC"))})],
                shape,
            )
        if kind == "bad_json":
            return _shape([pa.record_batch({"j": pa.array(['{"a": 1}', "{not json"])})], shape)
        if kind == "slow":

            def slow() -> Iterator[pa.RecordBatch]:
                while True:
                    time.sleep(0.2)
                    yield pa.record_batch({"x": pa.array([1], pa.int64())})

            return pa.RecordBatchReader.from_batches(pa.schema([("x", pa.int64())]), slow())
        if kind == "stream_error":
            return _stream_failing(2)
        if kind == "gen_error":

            def gen() -> Iterator[pa.RecordBatch]:
                yield pa.record_batch({"x": pa.array([1, 2], pa.int64())})
                raise RuntimeError("batch generator broke")

            return gen()
        if kind == "not_batches":
            return [pa.record_batch({"x": pa.array([1], pa.int64())}), (2,)]
        if kind == "not_struct":
            return [pa.array([1, 2, 3], pa.int64())]
        if kind == "tracked":
            return _tracked_reader(int(self.fdw_options.get("batches", "5")))
        if kind == "live":
            return [{"n": LIVE["count"]}]
        if kind == "numbers":
            # one Arrow source for widening conversions
            return _shape(
                [
                    pa.record_batch(
                        {
                            "i8": pa.array([-5, None, 7], pa.int8()),
                            "i16": pa.array([-300, 300, None], pa.int16()),
                            "i32": pa.array([None, -70000, 70000], pa.int32()),
                            "i64": pa.array([2**53, -(2**40), None], pa.int64()),
                            "u32": pa.array([2**32 - 1, 0, None], pa.uint32()),
                            "u64": pa.array([2**64 - 1, 1, None], pa.uint64()),
                            "f32": pa.array([1.25, None, -0.5], pa.float32()),
                            "f64": pa.array([1e300, -2.5, None], pa.float64()),
                            "dec": pa.array(
                                [Decimal("1.50"), Decimal("-0.01"), None], pa.decimal128(5, 2)
                            ),
                        }
                    )
                ],
                shape,
            )
        raise ValueError(f"unknown kind {kind}")
