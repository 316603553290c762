"""The lakehouse side: blocks -> Arrow (decode), Parquet partition files, their index in
PostgreSQL, just-in-time refresh and Iceberg publishing.

Layering: ``lake`` builds on :mod:`otelspans_fdw.schema`, :mod:`otelspans_fdw.quals` (the
predicate model), :mod:`otelspans_fdw.objstore` and :mod:`otelspans_fdw.db`; it never imports
:mod:`otelspans_fdw.fdw`.
"""

__all__: list[str] = []
