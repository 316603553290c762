"""Where the wrapper runs: finding the local database, its socket and data directory.

Inside a PostgreSQL backend the wrapper needs a metadata connection to *the database it is
running in*, as *the role a superuser fixed at setup*, without configuration.  That role is
the owner of the ``otelspans`` extension, never the role running the query: the lake writes
partitions, retires files and reads the whole index, which no reader may do, and what the
lake may do must not change with whoever scanned first in a backend.  Nothing in the
Multicorn2 API tells a wrapper the database or the owner.  Our host answers directly
(``_otelspans_host.backend_info()``); under another host (multicorn2) we find them from the
process itself:

* the backend's working directory is the data directory (PostgreSQL ``chdir``s there);
* ``postmaster.pid`` in it holds the port and the first Unix socket directory;
* one short connection to a maintenance database over that socket reads the row of our own
  backend pid in ``pg_stat_activity`` (``datname`` is visible to every role), then one to that
  database reads the extension's owner.

The resulting DSN is ``host=<socket dir> port=<port> dbname=<current db> user=<owner>``: a
local-socket login as the extension's owner, which Debian's default ``peer`` rule (the backend
runs as the ``postgres`` OS user) and ``trust`` both accept.  A server option ``dsn`` (set by a
superuser, on the server only; the host's validator refuses it anywhere else) or the server's
``OTELSPANS_DSN`` environment variable replaces it, e.g. when local connections need a password.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg

__all__ = ["BackendInfo", "backend_info", "default_dsn", "default_store_url"]


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """The local server as seen from inside one of its backends."""

    data_directory: Path
    port: int
    socket_directory: str
    database: str
    user: str
    #: owner of the otelspans extension in ``database`` (the lake's role); None without it
    lake_user: str | None = None
    #: the session's TimeZone setting, and when the current statement started (our host only)
    timezone: str | None = None
    statement_time: dt.datetime | None = None

    @property
    def dsn(self) -> str:
        """The lake's connection: this database over the local socket as the lake's role."""
        user = self.lake_user or _service_user()
        return (
            f"host={_quote(self.socket_directory)} port={self.port}"
            f" dbname={_quote(self.database)} user={_quote(user)}"
        )


def _service_user() -> str:
    """The OS user the server runs as: the role name that ``peer`` maps it to."""
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _quote(v: str) -> str:
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _postmaster_pid(datadir: Path) -> tuple[int, str]:
    lines = (datadir / "postmaster.pid").read_text().splitlines()
    port = int(lines[3])
    sockdir = lines[4].strip() if len(lines) > 4 and lines[4].strip() else "/var/run/postgresql"
    return port, sockdir


def _from_host() -> BackendInfo | None:
    """Ask our host extension directly (no extra connection); None under other hosts."""
    try:
        import _otelspans_host  # type: ignore[import-not-found]
    except ImportError:
        return None
    info = _otelspans_host.backend_info()
    if not info.get("database") or not info.get("user"):
        return None
    return BackendInfo(
        Path(info["data_directory"]),
        int(info["port"]),
        info.get("socket_directory") or "/var/run/postgresql",
        info["database"],
        info["user"],
        info.get("extension_owner"),
        info.get("timezone"),
        _from_us(info.get("statement_time_us")),
    )


def _from_us(us: int | None) -> dt.datetime | None:
    if us is None:
        return None
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=us)


def backend_info() -> BackendInfo | None:
    """The local server and session, or None when not running inside a backend.

    Asked anew each time under our host (it costs nothing and sees ``SET ROLE``); found once
    per backend otherwise.
    """
    hosted = _from_host()
    if hosted is not None:
        return hosted
    return _from_process()


@functools.cache
def _from_process() -> BackendInfo | None:
    datadir = Path(os.getcwd())
    if not (datadir / "postmaster.pid").is_file() or not (datadir / "PG_VERSION").is_file():
        return None
    import psycopg

    port, sockdir = _postmaster_pid(datadir)
    pid = os.getpid()
    for maint in ("postgres", "template1"):
        try:
            with psycopg.connect(
                host=sockdir, port=port, dbname=maint, autocommit=True, connect_timeout=10
            ) as c:
                row = c.execute(
                    "SELECT datname, usename FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchone()
        except psycopg.Error:
            continue
        if row and row[0]:
            return BackendInfo(
                datadir, port, sockdir, row[0], row[1], _owner(sockdir, port, row[0])
            )
    return None


def _owner(sockdir: str, port: int, database: str) -> str | None:
    import psycopg

    try:
        with psycopg.connect(
            host=sockdir, port=port, dbname=database, autocommit=True, connect_timeout=10
        ) as c:
            row = c.execute(
                "SELECT extowner::regrole::text FROM pg_catalog.pg_extension"
                " WHERE extname = 'otelspans'"
            ).fetchone()
    except psycopg.Error:
        return None
    return str(row[0]).strip('"') if row else None


def default_dsn() -> str:
    """``OTELSPANS_DSN``, else this database over the local socket as the extension's owner,
    else ``""``."""
    env = os.environ.get("OTELSPANS_DSN")
    if env:
        return env
    info = backend_info()
    return info.dsn if info else ""


_recorded_stores: dict[str, str] = {}


def default_store_url(conn: psycopg.Connection | None = None) -> str:
    """``OTELSPANS_STORE``, else the store the receiver recorded in the metadata database
    (``otel_settings``), else ``<data directory>/otelspans_store`` inside a backend."""
    env = os.environ.get("OTELSPANS_STORE")
    if env:
        return env
    if conn is not None:
        from otelspans_fdw import db

        # Read once per database and backend: the first receiver's store is never replaced,
        # and this runs on every scan.
        recorded = _recorded_stores.get(conn.info.dsn)
        if recorded is None:
            recorded = db.setting(conn, db.STORE_URL_SETTING)
            if recorded:
                _recorded_stores[conn.info.dsn] = recorded
        if recorded:
            return recorded
    datadir = Path(os.getcwd())
    if (datadir / "PG_VERSION").is_file():
        return str(datadir / "otelspans_store")
    return "otelspans-data"
