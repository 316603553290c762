"""The span schema: one source of truth for the Arrow side and the SQL side.

Everything that names or types a span column derives from :data:`COLUMNS`: the Arrow schema of
the Parquet partition files (:func:`arrow_schema`), the column list of the ``otel_spans``
foreign table and of the ``otel_spans(...)`` function's result (:func:`foreign_table_columns_sql`),
and the test that compares them with what ``CREATE EXTENSION`` installed.

Choices, and why:

* ``uuid`` columns are ``fixed_size_binary(16)``: 16 bytes instead of 36 characters, and the C
  host copies them straight into ``uuid`` datums.
* timestamps are ``timestamp('us', tz='UTC')``: exactly PostgreSQL's ``timestamptz`` resolution
  (so the overlap filter on files and PostgreSQL's recheck agree), and valid in Iceberg v2
  tables (nanosecond timestamps need format v3).  ``duration`` keeps the exact nanoseconds.
* text is ``utf8``.  On disk Parquet dictionary-encodes low-cardinality columns (kind, status,
  name, exe, the per-block ids) by itself; in memory we keep plain ``utf8`` so that the C host
  needs one string path (see bench/RESULTS.md for the measurement).
* JSON columns are ``utf8`` holding JSON text; the host turns it into ``jsonb``.

Bump :data:`SCHEMA_VERSION` whenever the file layout or the row mapping changes: partitions
record the version they were written with and older ones count as stale, so they are rebuilt
by the next scan that needs them (no migration of Parquet files).  Version 2 (issue 6) appended
``service_name`` (the process's ``service.name``): new columns go at the end, so the position of
the others never changes for users of ``SELECT *``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

__all__ = [
    "COLUMNS",
    "COLUMN_NAMES",
    "JSON_COLUMNS",
    "LOW_CARDINALITY_COLUMNS",
    "SCHEMA_VERSION",
    "SORT_COLUMN",
    "TABLE_NAME",
    "Column",
    "arrow_schema",
    "column",
    "foreign_table_columns_sql",
]

TABLE_NAME = "otel_spans"

#: Version of the partition file layout and row mapping (bump -> old partitions are stale).
SCHEMA_VERSION = 2

UUID = pa.binary(16)
TIMESTAMP = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True, slots=True)
class Column:
    """One span column: its name, SQL type, Arrow type, nullability and meaning."""

    name: str
    sql_type: str
    arrow_type: pa.DataType
    nullable: bool
    doc: str

    @property
    def field(self) -> pa.Field:
        """The Arrow field of this column."""
        return pa.field(self.name, self.arrow_type, nullable=self.nullable)


COLUMNS: tuple[Column, ...] = (
    Column("process_id", "uuid", UUID, False, "process of the block (otel_processes)"),
    Column("stream_id", "uuid", UUID, False, "stream of the block (otel_streams)"),
    Column("block_id", "uuid", UUID, False, "block the span was read from (otel_blocks)"),
    Column("insert_time", "timestamptz", TIMESTAMP, False, "when the block was ingested"),
    Column("exe", "text", pa.utf8(), True, "service.namespace/service.name of the process"),
    Column("username", "text", pa.utf8(), True, "owner of the process"),
    Column("computer", "text", pa.utf8(), True, "host.name of the process"),
    Column("process_properties", "jsonb", pa.utf8(), False, "resource attributes (JSON)"),
    Column("trace_id", "text", pa.utf8(), False, "32 lowercase hex digits"),
    Column("span_id", "text", pa.utf8(), False, "16 lowercase hex digits"),
    Column("parent_span_id", "text", pa.utf8(), True, "16 hex digits, NULL for a root span"),
    Column("start_time", "timestamptz", TIMESTAMP, False, "span start (microseconds)"),
    Column("end_time", "timestamptz", TIMESTAMP, False, "span end (microseconds)"),
    Column("duration", "bigint", pa.int64(), False, "end - start in nanoseconds (exact)"),
    Column("name", "text", pa.utf8(), False, "span name"),
    Column("kind", "text", pa.utf8(), False, "UNSPECIFIED, INTERNAL, SERVER, CLIENT, ..."),
    Column("status", "text", pa.utf8(), False, "UNSET, OK or ERROR"),
    Column("status_message", "text", pa.utf8(), True, "NULL when empty"),
    Column("properties", "jsonb", pa.utf8(), False, "span attributes + otel.scope.* (JSON)"),
    Column("events", "jsonb", pa.utf8(), False, "[{name, time (ns), attributes}] (JSON)"),
    Column("links", "jsonb", pa.utf8(), False, "[{trace_id, span_id, attributes}] (JSON)"),
    Column("service_name", "text", pa.utf8(), True, "service.name of the process"),
)

COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)
JSON_COLUMNS: frozenset[str] = frozenset(c.name for c in COLUMNS if c.sql_type == "jsonb")
#: Few distinct values per file: Parquet gets a dictionary page for them, and the text ones
#: reach the host dictionary-encoded, so it converts each distinct value once per batch.
LOW_CARDINALITY_COLUMNS: frozenset[str] = frozenset(
    {
        "process_id", "stream_id", "block_id", "insert_time", "exe", "service_name",
        "username", "computer", "process_properties", "name", "kind", "status",
        "status_message",
    }
)  # fmt: skip
assert LOW_CARDINALITY_COLUMNS <= set(COLUMN_NAMES), "unknown column in LOW_CARDINALITY_COLUMNS"

#: Files are sorted on this column, so row-group statistics prune time windows.
SORT_COLUMN = "start_time"

_BY_NAME = {c.name: c for c in COLUMNS}
_SCHEMA = pa.schema(
    [c.field for c in COLUMNS], metadata={"otelspans.schema_version": str(SCHEMA_VERSION)}
)


def column(name: str) -> Column:
    """The column called ``name`` (KeyError for an unknown name)."""
    return _BY_NAME[name]


def arrow_schema() -> pa.Schema:
    """The Arrow schema of decoded blocks and of partition files."""
    return _SCHEMA


def foreign_table_columns_sql(indent: str = "    ") -> str:
    """The column list of ``CREATE FOREIGN TABLE otel_spans (...)`` and of the function result.

    Generated here so that the extension SQL cannot drift from the files: the test suite
    compares this text with ``sql/otel_spans.sql.in`` and with the installed table.
    """
    return ",\n".join(f"{indent}{c.name} {c.sql_type}" for c in COLUMNS)
