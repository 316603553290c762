"""The Multicorn2 Python API, for hosts where ``multicorn`` itself is not importable.

multicorn2 is published neither on PyPI nor in Debian, so our own PostgreSQL host (``ext/``)
runs wrapper classes written against this module instead.  The names, signatures and
semantics follow multicorn2, so that a wrapper written as::

    try:
        from multicorn import ForeignDataWrapper, Qual
    except ImportError:
        from otelspans_fdw.multicorn_api import ForeignDataWrapper, Qual

behaves the same under both hosts.  Differences that a wrapper can observe are deliberate
and only additive: ``execute`` may return Arrow data (anything with ``__arrow_c_stream__``,
or an iterable of objects with ``__arrow_c_array__``), which our host converts in C; and a
wrapper may answer grouping, aggregates and ``ORDER BY ... LIMIT`` itself through
:meth:`ForeignDataWrapper.can_pushdown_upper` / :meth:`ForeignDataWrapper.execute_upper`
(never called by multicorn2, so a wrapper that has them still runs there, with PostgreSQL doing
that work).
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

__all__ = [
    "ALL",
    "ANY",
    "CRITICAL",
    "DEBUG",
    "ERROR",
    "INFO",
    "UNBOUND",
    "WARNING",
    "ColumnDefinition",
    "ForeignDataWrapper",
    "PostgresError",
    "Qual",
    "SortKey",
    "TableDefinition",
    "TransactionAwareForeignDataWrapper",
    "get_class",
    "import_module",
    "log_to_postgres",
    "quote_identifier",
    "quote_option",
]

# Levels are the logging module's, as in multicorn2.
DEBUG = logging.DEBUG
INFO = logging.INFO
WARNING = logging.WARNING
ERROR = logging.ERROR
CRITICAL = logging.CRITICAL

ANY = True
ALL = False
#: multicorn2's marker for "no value": kept for wrappers that compare with it.
UNBOUND = object()


class Qual:
    """A restriction ``field_name operator value`` that the planner offers to the wrapper.

    For ``col = ANY(array)`` / ``col IN (...)`` the operator is the tuple ``('=', True)`` and
    the value a list; ``col <> ALL(array)`` gives ``('<>', False)``.  ``IS NULL`` arrives as
    ``('=', None)`` and ``IS NOT NULL`` as ``('<>', None)``; a bare boolean column as
    ``('=', True)``.  PostgreSQL always rechecks quals, so a wrapper may ignore any of them.
    """

    __slots__ = ("field_name", "operator", "value")

    def __init__(self, field_name: str, operator: str | tuple[str, bool], value: Any):
        self.field_name = field_name
        self.operator = operator
        self.value = value

    @property
    def is_list_operator(self) -> bool:
        return isinstance(self.operator, tuple)

    @property
    def list_any_or_all(self) -> bool | None:
        """``ANY`` (True) or ``ALL`` (False) for list operators, else None."""
        return self.operator[1] if isinstance(self.operator, tuple) else None

    def __repr__(self) -> str:
        """multicorn2's text: ``col op value`` with ``str(value)``, lists as ``op ANY([...])``."""
        if isinstance(self.operator, tuple):
            kind = "ANY" if self.operator[1] else "ALL"
            return f"{self.field_name} {self.operator[0]} {kind}({self.value})"
        return f"{self.field_name} {self.operator} {self.value}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Qual):
            return NotImplemented
        return (self.field_name, self.operator, self.value) == (
            other.field_name,
            other.operator,
            other.value,
        )

    def __hash__(self) -> int:
        return hash((self.field_name, self.operator, repr(self.value)))


class SortKey(NamedTuple):
    """One ORDER BY item that the planner asks the wrapper to enforce."""

    attname: str
    attnum: int
    is_reversed: bool
    nulls_first: bool
    collate: str | None


def quote_identifier(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def quote_option(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _options_sql(options: Mapping[str, str]) -> str:
    return ",\n".join(f"{k} {quote_option(v)}" for k, v in sorted(options.items()))


class ColumnDefinition:
    """A column of the foreign table, as the host describes it to the wrapper (and as
    ``import_schema`` describes the columns of a table to create)."""

    def __init__(
        self,
        column_name: str,
        type_oid: int = 0,
        typmod: int = 0,
        type_name: str = "",
        base_type_name: str = "",
        options: Mapping[str, str] | None = None,
    ):
        self.column_name = column_name
        self.type_oid = type_oid
        self.typmod = typmod
        self.type_name = type_name
        self.base_type_name = base_type_name or type_name
        self.options = dict(options or {})

    def __repr__(self) -> str:
        opts = f" options {self.options}" if self.options else ""
        return f"{type(self).__name__}({self.column_name}, {self.type_oid}, {self.type_name}{opts})"

    def to_statement(self) -> str:
        """The column in ``CREATE FOREIGN TABLE``."""
        stmt = f"{quote_identifier(self.column_name)} {self.type_name}"
        if self.options:
            stmt += f" OPTIONS ( {_options_sql(self.options)} )"
        return stmt


class TableDefinition:
    """A foreign table that ``import_schema`` asks the host to create."""

    def __init__(
        self,
        table_name: str,
        schema: str | None = None,
        columns: list[ColumnDefinition] | None = None,
        options: Mapping[str, str] | None = None,
    ):
        self.table_name = table_name
        self.columns = list(columns or [])
        self.options = dict(options or {})

    def to_statement(self, schema_name: str, server_name: str) -> str:
        """``CREATE FOREIGN TABLE schema.table (...) SERVER server OPTIONS (...)``."""
        parts = [
            f"CREATE FOREIGN TABLE {quote_identifier(schema_name)}."
            f"{quote_identifier(self.table_name)} (",
            ",\n".join(c.to_statement() for c in self.columns),
            f" \n ) SERVER {quote_identifier(server_name)} ",
        ]
        if self.options:
            parts += [" OPTIONS (", _options_sql(self.options), ")"]
        return "\n".join(parts)


class ForeignDataWrapper:
    """Base class of a wrapper; the host makes one instance per foreign table and reuses it.

    ``options`` are the server options merged with the table options (table wins);
    ``columns`` maps column names to :class:`ColumnDefinition` in table order.
    """

    #: Planner startup cost of a scan (multicorn2's attribute; a subclass may set it).
    _startup_cost = 20

    def __init__(self, fdw_options: dict[str, str], fdw_columns: Mapping[str, ColumnDefinition]):
        self.fdw_options = fdw_options
        self.fdw_columns = fdw_columns

    def execute(
        self,
        quals: list[Qual],
        columns: Iterable[str],
        sortkeys: list[SortKey] | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> Iterable[Any]:
        """Return the rows: mappings, sequences in table column order, or Arrow data.

        ``None`` rows are skipped, as multicorn2 skips them."""
        return ()

    def get_rel_size(self, quals: list[Qual], columns: Iterable[str]) -> tuple[int, int]:
        """Estimated (rows, bytes per row); multicorn2's default is deliberately pessimistic."""
        return (100000000, len(list(columns)) * 100)

    def get_path_keys(self) -> list[tuple[tuple[str, ...], int]]:
        """Column sets that, given by equality, cut the result to the given number of rows."""
        return []

    def can_sort(self, sortkeys: list[SortKey]) -> list[SortKey]:
        """The sort keys the wrapper can enforce itself."""
        return []

    def can_limit(self, limit: int | None, offset: int | None) -> bool:
        """Whether the wrapper can apply LIMIT/OFFSET itself."""
        return False

    def can_pushdown_upper(self, query: dict[str, Any]) -> bool:
        """Whether :meth:`execute_upper` answers ``query`` exactly (our host only; default no).

        Asked while planning a query over this table alone whose top is a grouping with
        aggregates, or an ``ORDER BY ... LIMIT`` (top-N) over the table's rows or over such a
        grouping.  ``query`` is a dict:

        ``quals``
            every condition of the WHERE clause as :class:`Qual` objects.  Nothing is rechecked
            above the wrapper, so it must apply *all* of them exactly, or refuse.  While
            planning, values are not known yet (parameters, ``now()``) and are ``None``.
        ``grouped``
            True for a grouping (then ``group_by`` and ``aggregates`` are lists, or None when
            empty), absent for rows (then ``columns``).
        ``group_by``
            list of group keys (None: one group over all rows), each a dict
            with ``output`` (the Arrow field name to return) and either ``{"column": c}``, or
            ``{"function": "date_trunc", "unit": u, "column": c}`` (``u`` one of
            microseconds, milliseconds, second, minute, hour, day, week, month, quarter, year;
            local time at the session's fixed UTC offset, see ``utc_offset``), or
            ``{"function": "date_bin", "stride_us": n, "origin_us": n, "column": c}``
            (microseconds; origin since 1970-01-01 UTC), or ``{"condition": cond}`` (a
            boolean key such as ``parent_span_id IS NULL``).
        ``aggregates``
            list (present for a grouping) of dicts: ``output``, ``function`` (count, sum, avg,
            min, max, bool_or, bool_and, percentile_cont, percentile_disc), ``column`` (or
            None for ``count(*)`` and bool_or/bool_and), ``argument`` (the condition of
            bool_or/bool_and), ``distinct`` (``count(DISTINCT column)``), ``filter`` (the
            ``FILTER (WHERE ...)`` condition or None), ``fraction`` (a float or a list of
            floats for the percentiles) and ``type``, the SQL result type to return
            (``bigint``, ``numeric``, ``double precision``, ``double precision[]``, ...).
            Conditions are lists: ``["and"|"or", [c, ...]]``, ``["not", c]``,
            ``["cmp", column, op, value]`` (op one of = <> < <= > >=),
            ``["is_null"|"is_not_null", column]``, ``["in"|"not_in", column, [values]]``,
            ``["const", True|False|None]``, with SQL's three-valued logic.
        ``columns``
            (no grouping) the columns to return, for a top-N over the table's rows.
        ``order_by``
            None, or a list of ``{"output", "descending", "nulls_first"}``: an output of the
            grouping, or (no grouping) one of ``columns``.  Ties may come in any order.
        ``limit`` / ``offset``
            None / 0, or the LIMIT and OFFSET to apply after the ordering.

        At execution the dict also has ``utc_offset`` (seconds east of UTC of the session's
        TimeZone, or None when it has no fixed offset) and ``matches_nothing`` (a condition
        compared a column with NULL).
        """
        return False

    def execute_upper(self, query: dict[str, Any]) -> Any:
        """The answer to ``query`` (see :meth:`can_pushdown_upper`) as Arrow data with one field
        per ``output`` (or per column of ``columns``).  Values of SQL types without an Arrow
        type of their own (numeric, arrays) are given as text in PostgreSQL's input syntax;
        numeric text must carry the scale PostgreSQL would give (``avg`` of integers...)."""
        raise NotImplementedError("execute_upper")

    def explain(
        self,
        quals: list[Qual],
        columns: Iterable[str],
        sortkeys: list[SortKey] | None = None,
        verbose: bool = False,
    ) -> list[str]:
        """Lines shown under the foreign scan in EXPLAIN."""
        return []

    # -- the writable API: the host calls these for INSERT, UPDATE and DELETE ----------------

    @property
    def rowid_column(self) -> str:
        """The column that identifies a row for UPDATE and DELETE (fetched with the row)."""
        raise NotImplementedError("This FDW does not support the writable API")

    @property
    def modify_batch_size(self) -> int:
        """Rows per :meth:`bulk_insert` call; 1 means :meth:`insert` row by row."""
        return 1

    def insert(self, values: dict[str, Any]) -> dict[str, Any] | None:
        """Insert one row; return the row as stored (for RETURNING), or None for ``values``."""
        raise NotImplementedError("This FDW does not support the writable API")

    def bulk_insert(self, all_values: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        raise NotImplementedError("This FDW does not support the bulk insert writable API")

    def update(self, oldvalues: dict[str, Any], newvalues: dict[str, Any]) -> Any:
        """Update the row whose rowid is ``oldvalues[rowid_column]``; return as for insert."""
        raise NotImplementedError("This FDW does not support the writable API")

    def delete(self, oldvalues: Any) -> Any:
        """Delete the row whose rowid is ``oldvalues`` (multicorn2 passes the rowid value)."""
        raise NotImplementedError("This FDW does not support the writable API")

    # -- hooks: called on the instances this backend has used in the transaction ------------

    def begin(self, serializable: bool) -> None:
        """First use of the table in a transaction."""

    def pre_commit(self) -> None:
        """Before the commit: an error here still rolls the transaction back."""

    def commit(self) -> None:
        """After the commit (too late to fail it)."""

    def rollback(self) -> None:
        """The transaction was rolled back."""

    def sub_begin(self, level: int) -> None:
        """A savepoint was set at nesting ``level``."""

    def sub_commit(self, level: int) -> None:
        """The savepoint at ``level`` was released."""

    def sub_rollback(self, level: int) -> None:
        """The transaction was rolled back to the savepoint at ``level``."""

    def end_scan(self) -> None:
        """A scan of the table ended."""

    def end_modify(self) -> None:
        """An INSERT/UPDATE/DELETE on the table ended."""

    @classmethod
    def import_schema(
        cls,
        schema: str,
        srv_options: dict[str, str],
        options: dict[str, str],
        restriction_type: str | None,
        restricts: list[str],
    ) -> list[TableDefinition]:
        """The tables of IMPORT FOREIGN SCHEMA; ``restriction_type`` is 'limit', 'except' or
        None, ``restricts`` the names of its LIMIT TO / EXCEPT list."""
        raise NotImplementedError("This FDW does not support IMPORT FOREIGN SCHEMA")


class TransactionAwareForeignDataWrapper(ForeignDataWrapper):
    """Keeps the changes of the current transaction in ``current_transaction_state``."""

    def __init__(self, fdw_options: dict[str, str], fdw_columns: Mapping[str, ColumnDefinition]):
        super().__init__(fdw_options, fdw_columns)
        self._init_transaction_state()

    def _init_transaction_state(self) -> None:
        self.current_transaction_state: list[tuple[str, Any]] = []

    def insert(self, values: dict[str, Any]) -> None:
        self.current_transaction_state.append(("insert", values))

    def update(self, oldvalues: dict[str, Any], newvalues: dict[str, Any]) -> None:
        self.current_transaction_state.append(("update", (oldvalues, newvalues)))

    def delete(self, oldvalues: Any) -> None:
        self.current_transaction_state.append(("delete", oldvalues))

    def rollback(self) -> None:
        self._init_transaction_state()


def import_module(name: str, package: str | None = None) -> types.ModuleType:
    return importlib.import_module(name, package)


def get_class(module_path: str) -> type:
    """The class named by ``package.module.Class`` (how a ``wrapper`` option is read)."""
    module_name, _, class_name = module_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)  # type: ignore[no-any-return]


class PostgresError(Exception):
    """Raised by ``log_to_postgres`` at ERROR or above; the host reports it as an ERROR."""

    sqlstate = "HV000"

    def __init__(self, message: str, hint: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.hint = hint
        self.detail = detail


_logger = logging.getLogger("otelspans_fdw.wrapper")


def log_to_postgres(
    message: Any, level: int = INFO, hint: str | None = None, detail: str | None = None
) -> None:
    """Send a message to the PostgreSQL log / client; at ERROR and above, abort the query.

    Under our host the message reaches ``ereport`` through the builtin ``_otelspans_host``
    module; errors are raised as :class:`PostgresError` so that Python unwinds cleanly before
    the host turns it into an ``ERROR`` (never a longjmp through Python frames).
    """
    # multicorn2 formats any object (a SortKey, a list of quals) with str().
    message = message if isinstance(message, str) else str(message)
    hint = hint if hint is None or isinstance(hint, str) else str(hint)
    detail = detail if detail is None or isinstance(detail, str) else str(detail)
    if level >= ERROR:
        raise PostgresError(message, hint=hint, detail=detail)
    try:
        import _otelspans_host  # type: ignore[import-not-found]
    except ImportError:
        _logger.log(level, message)
        return
    _otelspans_host.log(level, message, hint, detail)


def _multicorn_modules() -> dict[str, types.ModuleType]:
    """``multicorn``, ``multicorn.utils`` and ``multicorn.compat`` made of this module.

    A wrapper written for multicorn2 imports ``from multicorn import ForeignDataWrapper`` and
    ``from multicorn.utils import log_to_postgres``; in our host's backend those names must be
    ours (multicorn2's own package needs its C module to log and report errors).  The wrappers
    multicorn2 ships (``multicorn.csvfdw``...) still load from its package when it is on
    ``sys.path``: its directories are the alias's ``__path__``.
    """
    me = sys.modules[__name__]
    pkg = types.ModuleType("multicorn", "The Multicorn2 API, as our host provides it.")
    for name in __all__:
        setattr(pkg, name, getattr(me, name))
    pkg.__version__ = "3.2"
    from importlib.machinery import PathFinder

    spec = PathFinder.find_spec("multicorn")
    pkg.__path__ = list(spec.submodule_search_locations or []) if spec else []
    utils = types.ModuleType("multicorn.utils")
    for name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "log_to_postgres"):
        setattr(utils, name, getattr(me, name))
    utils.REPORT_CODES = {DEBUG: 0, INFO: 1, WARNING: 2, ERROR: 3, CRITICAL: 4}  # type: ignore[attr-defined]
    utils.check_interrupts = lambda: None  # type: ignore[attr-defined]  # signals reach Python
    compat = types.ModuleType("multicorn.compat")
    compat.unicode_ = str  # type: ignore[attr-defined]
    compat.basestring_ = str  # type: ignore[attr-defined]
    compat.bytes_ = lambda x: bytes(x, "utf8")  # type: ignore[attr-defined]
    pkg.utils, pkg.compat = utils, compat  # type: ignore[attr-defined]
    return {"multicorn": pkg, "multicorn.utils": utils, "multicorn.compat": compat}


def install_multicorn_alias() -> None:
    """Make ``import multicorn`` give this API (our host calls it when it starts Python)."""
    sys.modules.update(_multicorn_modules())
