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


# --- ingestion (issue 3): a real `otelspans serve` subprocess ----------------------------------


class ReceiverProcess:
    """A running ``otelspans serve`` subprocess on free ports (see the ``receiver`` fixture)."""

    def __init__(self, dsn: str, store: Path, extra: list[str]):
        import subprocess
        import sys

        self.dsn, self.store, self.extra = dsn, store, extra
        argv = [
            sys.executable,
            "-m",
            "otelspans_fdw.cli",
            "serve",
            "--dsn",
            dsn,
            "--store",
            str(store),
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            *extra,
        ]
        # Output goes to files, not pipes: nobody drains a pipe during a test, and a receiver
        # that logs 64 KB into one blocks on its next write.
        logs = Path(tempfile.mkdtemp(prefix="otelspans-receiver-"))
        self.stdout_path, self.stderr_path = logs / "stdout", logs / "stderr"
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True, cwd=ROOT)
        line = self._first_line(timeout=60.0)
        if "listening" not in line:
            self.proc.kill()
            raise RuntimeError(f"receiver did not start: {line}{self.stderr_path.read_text()}")
        fields = dict(p.split("=") for p in line.split() if "=" in p)
        self.http_port, self.grpc_port = int(fields["http"]), int(fields["grpc"])
        self.metrics_port = int(fields.get("metrics", -1))  # with --metrics-port

    def _first_line(self, timeout: float) -> str:
        """The receiver's first complete line of output ("listening ..."), or "" if it exits
        or says nothing within ``timeout``."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.stdout_path.read_text()
            if "\n" in text:
                return text.split("\n", 1)[0] + "\n"
            if self.proc.poll() is not None:
                return text
            time.sleep(0.02)
        return ""

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1/traces"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self, sig: int = 15) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)


@pytest.fixture
def receiver_factory(fresh_dsn: str, tmp_path: Path) -> Iterator[object]:
    """Start receivers (``factory(*extra_args)``) on ``fresh_dsn`` and ``tmp_path/store``."""
    started: list[ReceiverProcess] = []

    def factory(*extra: str, store: Path | None = None) -> ReceiverProcess:
        r = ReceiverProcess(fresh_dsn, store or tmp_path / "store", list(extra))
        started.append(r)
        return r

    yield factory
    for r in started:
        r.stop(9)


@pytest.fixture
def receiver(receiver_factory: object) -> ReceiverProcess:
    """One receiver with default settings."""
    return receiver_factory()  # type: ignore[operator]
