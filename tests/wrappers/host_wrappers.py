"""Small Multicorn2-API wrappers that exercise the host (no otel code).

They report what the host handed them (quals with Python value types, columns, sort keys,
limit) as NOTICEs through ``log_to_postgres``, so tests observe pushdown over a real
connection.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

try:
    from multicorn import ForeignDataWrapper, Qual, SortKey
    from multicorn.utils import ERROR, INFO, WARNING, log_to_postgres
except ImportError:
    from otelspans_fdw.multicorn_api import (
        ERROR,
        INFO,
        WARNING,
        ForeignDataWrapper,
        Qual,
        SortKey,
        log_to_postgres,
    )

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
NS = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8")


def sample_row(i: int) -> dict[str, Any]:
    """Row i of the sample data set; tests compute the same rows independently."""
    return {
        "id": i,
        "name": f"name{i}",
        "ts": T0 + dt.timedelta(minutes=i, microseconds=i),
        "u": uuid.uuid5(NS, str(i)),
        "n": Decimal(i) / 4,
        "flag": i % 2 == 0,
        "data": bytes([i % 256, 0, 255]),
        "tags": [f"t{i}", "x"],
        "f": i * 0.5,
        "d": dt.date(2024, 1, 1) + dt.timedelta(days=i),
        "j": {"i": i, "s": [1, "two"]},
        "small": i % 100,
        "nothing": None,
    }


def describe_quals(quals: list[Qual]) -> str:
    parts = []
    for q in sorted(quals, key=repr):
        value = q.value
        if isinstance(value, list):
            vtype = "list[" + ",".join(sorted({type(v).__name__ for v in value})) + "]"
        else:
            vtype = type(value).__name__
        tz = ""
        if isinstance(value, dt.datetime):
            tz = "aware" if value.tzinfo is not None else "naive"
        parts.append(f"{q.field_name}|{q.operator}|{value!r}|{vtype}{'|' + tz if tz else ''}")
    return "; ".join(parts)


class Echo(ForeignDataWrapper):
    """Sample rows; reports every call.  Options: rows (count), sequence (rows as tuples)."""

    def __init__(self, options: dict[str, str], columns: dict[str, Any]):
        super().__init__(options, columns)
        self.nrows = int(options.get("rows", "20"))
        self.as_sequence = options.get("sequence") == "true"
        self.columns = columns

    def get_rel_size(self, quals: list[Qual], columns: Any) -> tuple[int, int]:
        for q in quals:
            if q.field_name == "id" and q.operator == "=":
                return (1, 100)
        return (self.nrows, 100)

    def get_path_keys(self) -> list[tuple[tuple[str, ...], int]]:
        return [(("id",), 1)]

    def can_sort(self, sortkeys: list[SortKey]) -> list[SortKey]:
        return (
            [k for k in sortkeys if k.attname in ("id", "name")]
            if all(k.attname in ("id", "name") for k in sortkeys)
            else []
        )

    def can_limit(self, limit: int | None, offset: int | None) -> bool:
        return True

    def explain(self, quals, columns, sortkeys=None, verbose=False) -> list[str]:
        lines = [f"echo of {self.nrows} rows"]
        if verbose:
            lines.append("columns: " + ",".join(sorted(columns)))
        return lines

    def execute(self, quals, columns, sortkeys=None, limit=None, offset=None) -> Iterator[Any]:
        log_to_postgres(
            f"execute quals=[{describe_quals(quals)}] columns={','.join(sorted(columns))}"
            f" sortkeys={[(k.attname, k.is_reversed) for k in sortkeys or []]} limit={limit}",
            INFO,
        )
        rows = [sample_row(i) for i in range(self.nrows)]
        for q in quals:
            if q.field_name == "id" and q.operator == "=":
                rows = [r for r in rows if r["id"] == q.value]
        for key in reversed(sortkeys or []):
            rows.sort(key=lambda r, k=key.attname: r[k], reverse=key.is_reversed)
        if limit is not None:
            rows = rows[:limit]
        names = list(self.columns)
        for r in rows:
            if self.as_sequence:
                yield tuple(r.get(n) for n in names)
            else:
                yield {k: v for k, v in r.items() if k in columns}


class Tracked:
    """An iterator that counts its live instances, to show the host drops its references."""

    live = 0

    def __init__(self, rows: list[dict[str, Any]]):
        Tracked.live += 1
        self.rows = iter(rows)

    def __iter__(self) -> Tracked:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self.rows)

    def __del__(self) -> None:
        Tracked.live -= 1


class TrackedRows(ForeignDataWrapper):
    """mode 'bad': a PostgreSQL error (bad value) mid-iteration; 'live': count live iterators."""

    def execute(self, quals, columns, sortkeys=None, limit=None, offset=None) -> Any:
        if self.fdw_options.get("mode") == "live":
            return [{"x": Tracked.live}]
        return Tracked([{"x": 1}, {"x": "not a number"}, {"x": 3}])


class Failing(ForeignDataWrapper):
    """Fails on purpose; option mode says how."""

    def __init__(self, options: dict[str, str], columns: dict[str, Any]):
        super().__init__(options, columns)
        self.mode = options.get("mode", "exception")
        if self.mode == "init":
            raise RuntimeError("cannot start: init failure")

    def execute(self, quals, columns, sortkeys=None, limit=None, offset=None) -> Iterator[Any]:
        if self.mode == "exception":
            raise ValueError("boom from python")
        if self.mode == "pgerror":
            log_to_postgres(
                "wrapper refuses", ERROR, hint="Try the other thing.", detail="Why not."
            )
        if self.mode == "warning":
            log_to_postgres("just a warning", WARNING, hint="Nothing to do.")
            yield {"x": 1}
            return
        if self.mode == "midstream":
            for i in range(5):
                yield {"x": i}
            raise KeyError("midstream failure")
        if self.mode == "badrow":
            yield 42
            return
        if self.mode == "badvalue":
            yield {"x": "not a number"}
            return

        if self.mode == "busy":
            # Pure Python work that never yields: only an interrupt can stop it.
            n = 0
            while True:
                n += 1
        if self.mode == "sleepy":
            import time

            for _ in range(100000):
                time.sleep(0.05)
        yield {"x": 1}


class Described(ForeignDataWrapper):
    """One row describing the instance: its options, columns and identity."""

    instances = 0

    def __init__(self, options: dict[str, str], columns: dict[str, Any]):
        super().__init__(options, columns)
        Described.instances += 1
        self.serial = Described.instances
        self.options = options
        self.columns = columns

    def execute(self, quals, columns, sortkeys=None, limit=None, offset=None) -> Iterator[Any]:
        yield {
            "options": json.dumps(self.options, sort_keys=True),
            "columns": ",".join(f"{c.column_name}:{c.type_name}" for c in self.columns.values()),
            "serial": self.serial,
            "pid": os.getpid(),
        }


class SizeProbe(Echo):
    """Estimates 1,000 rows per qual value that reached get_rel_size, plus 7."""

    def get_rel_size(self, quals: list[Qual], columns: Any) -> tuple[int, int]:
        return (7 + 1000 * sum(q.value is not None for q in quals), 100)
