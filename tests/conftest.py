"""Shared fixtures: one throwaway PostgreSQL cluster per test session, real connections.

The cluster runs as the ``postgres`` OS user; the working tree's ``otelspans_fdw`` package and
the test wrappers in ``tests/wrappers`` are copied into the cluster's pylib so that the backend
imports exactly the code under test.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from otelspans_fdw.devcluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent


def python_sources() -> list[Path]:
    """The package, and each test wrapper module as a top-level module (``host_wrappers``)."""
    return [ROOT / "otelspans_fdw", *sorted((ROOT / "tests" / "wrappers").glob("*.py"))]


@pytest.fixture(scope="session")
def pg() -> Iterator[LocalCluster]:
    base = Path(tempfile.mkdtemp(prefix="otelspans-test-"))
    cluster = LocalCluster(base)
    cluster.init(python_sources())
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def fresh_dsn(pg: LocalCluster) -> Iterator[str]:
    """A new empty database for one test, dropped afterwards."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        yield pg.dsn(name)
    finally:
        with psycopg.connect(pg.dsn(), autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
