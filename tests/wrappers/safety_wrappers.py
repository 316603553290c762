"""Wrappers that return rows the host must handle with care (memory safety of the row path)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

try:
    from multicorn import ForeignDataWrapper
except ImportError:
    from otelspans_fdw.multicorn_api import ForeignDataWrapper

#: Big enough that the allocator returns a freed value's memory to the OS at once.
BIG = 4 << 20


class ComputedRow(Mapping[str, Any]):
    """A mapping that builds each value when asked: only the caller holds a reference to it."""

    def __init__(self, i: int):
        self.i = i

    def __getitem__(self, key: str) -> Any:
        if key == "id":
            return self.i * 1_000_003  # beyond the small-int cache: a new object each time
        if key == "big":
            return "x" * BIG + str(self.i)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(("id", "big"))

    def __len__(self) -> int:
        return 2


class ComputedRows(ForeignDataWrapper):
    """Rows as read-only views of :class:`ComputedRow`: a mapping that is not a sequence (a
    Python class with ``__getitem__`` counts as one), so the host reads it key by key."""

    def execute(self, quals, columns, sortkeys=None, limit=None, offset=None) -> Iterator[Any]:
        for i in range(int(self.fdw_options.get("rows", "20"))):
            yield MappingProxyType(ComputedRow(i))
