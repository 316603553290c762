"""Wrappers of the host benchmark (bench/bench_host.py): one data set, two paths.

The data (``rows`` option, 1M by default) is built once per backend and cached, so that a
measured scan costs only the host's work: ``BulkRows`` returns the cached pyarrow Table (the
bulk path, through ``__arrow_c_stream__``), ``PythonRows`` yields the cached tuples (the row
path).  Columns: c1 uuid, c2 int8, c3 text, c4 text, c5 timestamptz, c6 timestamptz, c7 int8,
c8 float8.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

try:
    from multicorn import ForeignDataWrapper
except ImportError:
    from otelspans_fdw.multicorn_api import ForeignDataWrapper

T0_US = 1_750_000_000 * 1_000_000  # 2025-06-15 UTC, in microseconds since 1970
SERVICES = [f"service-{k}" for k in range(20)]
OPERATIONS = [f"GET /api/v1/resource/{k}" for k in range(500)]

SCHEMA = pa.schema(
    [
        ("c1", pa.binary(16)),
        ("c2", pa.int64()),
        ("c3", pa.string()),
        ("c4", pa.string()),
        ("c5", pa.timestamp("us", tz="UTC")),
        ("c6", pa.timestamp("us", tz="UTC")),
        ("c7", pa.int64()),
        ("c8", pa.float64()),
    ]
)

_TABLES: dict[int, pa.Table] = {}
_ROWS: dict[int, list[tuple[Any, ...]]] = {}


def build_table(n: int) -> pa.Table:
    """n rows of span-like data, deterministic."""
    if n in _TABLES:
        return _TABLES[n]
    ids = bytearray()
    for i in range(n):
        ids += (i * 0x9E3779B97F4A7C15 & (2**128 - 1)).to_bytes(16, "little")
    starts = [T0_US + i * 1000 for i in range(n)]
    table = pa.table(
        [
            pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), n, [None, pa.py_buffer(ids)]),
            pa.array(range(n), pa.int64()),
            pa.array([SERVICES[i % 20] for i in range(n)]),
            pa.array([OPERATIONS[i % 500] for i in range(n)]),
            pa.array(starts, pa.timestamp("us", tz="UTC")),
            pa.array([s + 1500 + i % 997 for i, s in enumerate(starts)], pa.timestamp("us", "UTC")),
            pa.array([i % 997 * 1000 for i in range(n)], pa.int64()),
            pa.array([i * 0.25 for i in range(n)], pa.float64()),
        ],
        schema=SCHEMA,
    )
    _TABLES[n] = table
    return table


def build_rows(n: int) -> list[tuple[Any, ...]]:
    """The same rows as Python tuples (uuid.UUID, int, str, str, aware datetimes, int, float)."""
    if n in _ROWS:
        return _ROWS[n]
    table = build_table(n)
    cols = [c.to_pylist() for c in table.columns]  # timestamps come as aware datetimes
    rows = [
        (uuid.UUID(bytes=c1), c2, c3, c4, c5, c6, c7, c8)
        for c1, c2, c3, c4, c5, c6, c7, c8 in zip(*cols, strict=True)
    ]
    _ROWS[n] = rows
    return rows


class BulkRows(ForeignDataWrapper):
    """The bulk path: the cached pyarrow Table."""

    def __init__(self, options: dict[str, str], columns: dict[str, Any]):
        super().__init__(options, columns)
        self.n = int(options.get("rows", "1000000"))

    def get_rel_size(self, quals: Any, columns: Any) -> tuple[int, int]:
        return (self.n, 100)

    def execute(self, quals, columns, sortkeys=None, limit=None, offset=None) -> pa.Table:
        return build_table(self.n)


class PythonRows(ForeignDataWrapper):
    """The row path: the cached tuples, in table column order."""

    def __init__(self, options: dict[str, str], columns: dict[str, Any]):
        super().__init__(options, columns)
        self.n = int(options.get("rows", "1000000"))

    def get_rel_size(self, quals: Any, columns: Any) -> tuple[int, int]:
        return (self.n, 100)

    def execute(self, quals, columns, sortkeys=None, limit=None, offset=None) -> Iterator[Any]:
        return iter(build_rows(self.n))
