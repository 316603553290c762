"""One cluster with both hosts: our extension and a real multicorn2, over the same spans.

Run by ``scripts/check-multicorn2.sh SRC``, which builds multicorn2 from a source tree and
installs it into a throwaway copy of PostgreSQL; it is not part of ``make test`` (multicorn2
cannot be installed on a fresh machine without its source).  ``MULTICORN2_PYTHONPATH`` names
the directory holding multicorn2's ``multicorn`` Python package.

Both hosts read the same metadata database and the same store: the database has the
``otelspans`` extension (its ``otel_spans`` runs on our host) and, in schema ``mc``, an
``otel_spans`` with the same columns on a multicorn2 server running the same wrapper class.
A connection with ``search_path = mc, public`` therefore runs every README query unchanged
under multicorn2.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "tests"))

from otelspans_fdw.devcluster import LocalCluster  # noqa: E402


def _multicorn_path() -> str:
    path = os.environ.get("MULTICORN2_PYTHONPATH", "")
    if not (Path(path) / "multicorn" / "__init__.py").is_file():
        pytest.exit(
            "MULTICORN2_PYTHONPATH must name the directory holding multicorn2's Python package;"
            " run scripts/check-multicorn2.sh SRC",
            returncode=2,
        )
    return path


@pytest.fixture(scope="session")
def pg() -> Iterator[LocalCluster]:
    base = Path(tempfile.mkdtemp(prefix="otelspans-compat-"))
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    cluster = LocalCluster(base)
    # multicorn2 has no setting for sys.path: the postmaster's PYTHONPATH puts multicorn2's
    # package, the working tree's copy of otelspans_fdw and the venv's libraries on it.
    cluster.env = {
        "PYTHONPATH": ":".join([_multicorn_path(), str(cluster.pylib), str(site / "site-packages")])
    }
    cluster.init([ROOT / "otelspans_fdw", *sorted((ROOT / "tests" / "wrappers").glob("*.py"))])
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def fresh_dsn(pg: LocalCluster) -> Iterator[str]:
    name = "c_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        yield pg.dsn(name)
    finally:
        with psycopg.connect(pg.dsn(), autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
