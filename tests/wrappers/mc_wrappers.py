"""Wrappers written exactly as for multicorn2: ``import multicorn`` with no fallback.

Our host must run them unchanged; they report what they see as NOTICEs.
"""

from __future__ import annotations

from typing import Any

from multicorn import ColumnDefinition, ForeignDataWrapper, TableDefinition
from multicorn.compat import unicode_
from multicorn.utils import ERROR, INFO, log_to_postgres


class Reporter(ForeignDataWrapper):
    """Logs its quals (their text), sort keys and columns; yields ``rows`` rows, with a
    ``None`` row between each (multicorn2 skips those)."""

    def __init__(self, options: dict[str, str], columns: dict[str, Any]):
        super().__init__(options, columns)
        self.nrows = int(options.get("rows", "3"))
        self.columns = columns

    def can_sort(self, sortkeys: list[Any]) -> list[Any]:
        return sortkeys

    def execute(self, quals, columns, sortkeys=None, limit=None, offset=None):  # type: ignore[no-untyped-def]
        log_to_postgres(quals, INFO)
        for sk in sortkeys or []:
            log_to_postgres(sk)
        log_to_postgres(unicode_(sorted(columns)))
        for i in range(self.nrows):
            yield {"id": i, "name": f"n{i}", "flag": i % 2 == 0}
            yield None


class Importer(ForeignDataWrapper):
    """IMPORT FOREIGN SCHEMA: tables t1..t3 described with TableDefinition."""

    def execute(self, quals, columns, sortkeys=None, limit=None, offset=None):  # type: ignore[no-untyped-def]
        yield {"id": 1}

    @classmethod
    def import_schema(cls, schema, srv_options, options, restriction_type, restricts):  # type: ignore[no-untyped-def]
        tables = [
            TableDefinition(
                f"t{i}",
                columns=[
                    ColumnDefinition("id", type_name="integer"),
                    ColumnDefinition(
                        "label", type_name="character varying(20)", options={"k": "v"}
                    ),
                ],
                options={"schema": schema, **options},
            )
            for i in range(1, 4)
        ]
        if restriction_type == "limit":
            tables = [t for t in tables if t.table_name in restricts]
        elif restriction_type == "except":
            tables = [t for t in tables if t.table_name not in restricts]
        return tables


class Store(ForeignDataWrapper):
    """A table kept in this backend's memory, changed only by committed transactions.

    Options: ``batch`` (modify_batch_size), ``fail`` (a hook that raises).  Every hook logs
    its name, so tests read the order PostgreSQL called them in.  ``id`` is the rowid; an
    INSERT without one gets the next number (RETURNING shows it).
    """

    committed: dict[str, dict[int, dict[str, Any]]] = {}

    def __init__(self, options: dict[str, str], columns: dict[str, Any]):
        super().__init__(options, columns)
        self.key = options.get("name", "default")
        self.batch = int(options.get("batch", "1"))
        self.fail = options.get("fail", "")
        self.committed.setdefault(self.key, {})
        self.work: dict[int, dict[str, Any]] | None = None
        self.saves: list[dict[int, dict[str, Any]]] = []

    @property
    def rowid_column(self) -> str:
        return "id"

    @property
    def modify_batch_size(self) -> int:
        return self.batch

    def _log(self, what: str) -> None:
        log_to_postgres(what)
        if self.fail == what.split("(")[0]:
            log_to_postgres(f"{what} refused", ERROR, hint="the test asked for it")

    def _rows(self) -> dict[int, dict[str, Any]]:
        return self.work if self.work is not None else self.committed[self.key]

    def begin(self, serializable: bool) -> None:
        self.work = {k: dict(v) for k, v in self.committed[self.key].items()}
        self._log(f"begin({serializable})")

    def pre_commit(self) -> None:
        self._log("pre_commit()")

    def commit(self) -> None:
        assert self.work is not None
        self.committed[self.key] = self.work
        self.work, self.saves = None, []
        self._log("commit()")

    def rollback(self) -> None:
        self.work, self.saves = None, []
        self._log("rollback()")

    def sub_begin(self, level: int) -> None:
        self.saves.append({k: dict(v) for k, v in self._rows().items()})
        self._log(f"sub_begin({level})")

    def sub_commit(self, level: int) -> None:
        self.saves.pop()
        self._log(f"sub_commit({level})")

    def sub_rollback(self, level: int) -> None:
        self.work = self.saves.pop()
        self._log(f"sub_rollback({level})")

    def end_scan(self) -> None:
        self._log("end_scan()")

    def end_modify(self) -> None:
        self._log("end_modify()")

    def execute(self, quals, columns, sortkeys=None, limit=None, offset=None):  # type: ignore[no-untyped-def]
        for k in sorted(self._rows()):
            yield self._rows()[k]

    def insert(self, values: dict[str, Any]) -> dict[str, Any]:
        rows = self._rows()
        if values.get("id") is None:
            values = {**values, "id": max(rows, default=0) + 1}
        rows[values["id"]] = values
        return values

    def bulk_insert(self, all_values: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self._log(f"bulk_insert({len(all_values)})")
        return [self.insert(v) for v in all_values]

    def update(self, oldvalues: Any, newvalues: dict[str, Any]) -> dict[str, Any]:
        rows = self._rows()
        del rows[oldvalues]
        newvalues = {**newvalues, "note": f"updated from {oldvalues}"}
        rows[newvalues["id"]] = newvalues
        return newvalues

    def delete(self, oldvalues: Any) -> None:
        del self._rows()[oldvalues]


class Shapes(ForeignDataWrapper):
    """Values multicorn2 converts specially (a dict into hstore, nested lists into a 2-D
    array); ``startup`` sets ``_startup_cost``; sorts on its first requested key only;
    ``get_path_keys`` says ``id`` gives one row."""

    def __init__(self, options: dict[str, str], columns: dict[str, Any]):
        super().__init__(options, columns)
        self._startup_cost = int(options.get("startup", "20"))
        self.ragged = options.get("ragged") == "true"
        self.nrows = int(options.get("rows", "3"))

    def get_rel_size(self, quals: list[Any], columns: Any) -> tuple[int, int]:
        return (1000, 10)

    def get_path_keys(self) -> list[tuple[tuple[str, ...], int]]:
        return [(("id",), 1)]

    def can_sort(self, sortkeys: list[Any]) -> list[Any]:
        return sortkeys[:1]

    def execute(self, quals, columns, sortkeys=None, limit=None, offset=None):  # type: ignore[no-untyped-def]
        rows = [
            {
                "id": i,
                "name": f"n{i % 2}",
                "h": {"a": str(i), "b": None, 'q"': "x\\y"},
                "grid": [[1, 2], [3]] if self.ragged else [[i, 2], [3, None]],
            }
            for i in range(self.nrows)
        ]
        if sortkeys:
            rows.sort(key=lambda r: r[sortkeys[0].attname], reverse=sortkeys[0].is_reversed)
        yield from rows
