"""Numeric wrapper and server options, read the same way by the wrapper and by maintenance.

Options reach Python as text; a bare ``int()`` turned a typo into a ValueError with no SQLSTATE
and no hint, at scan time, in whichever code path read the option first.
"""

from __future__ import annotations

from collections.abc import Mapping

from otelspans_fdw.exceptions import InvalidArgumentError

__all__ = ["positive_int"]

#: Options only a superuser may set, and only on the server (``ext/option_rights.c``).
_SERVER_ONLY = frozenset({"max_processes", "max_stale_spans"})


def positive_int(options: Mapping[str, str], name: str, default: str | int) -> int:
    """Option ``name`` as a positive integer (``default`` when absent); a clear error otherwise."""
    text = options.get(name, default)
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        where = "SERVER otel_spans_server" if name in _SERVER_ONLY else "FOREIGN TABLE ..."
        raise InvalidArgumentError(
            f"option {name} must be a positive integer, not {text!r}",
            hint=f"ALTER {where} OPTIONS (SET {name} '{default}').",
        )
    return value
