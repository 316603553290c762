"""A throwaway local PostgreSQL cluster for tests, benchmarks and the demo.

PostgreSQL refuses to run as root, and the backend must be able to read the Python
environment and every module it imports.  So when we are root the cluster is owned by and
started as the ``postgres`` OS user, and modules the backend must import from a working tree
are copied into a ``pylib`` directory inside the cluster (readable by that user) which the
``otelspans.python_path`` setting puts first on ``sys.path``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PG_BINDIR = Path(os.environ.get("OTELSPANS_PG_BINDIR", "/usr/lib/postgresql/15/bin"))
SERVICE_USER = "postgres"


def free_port() -> int:
    """Ask the kernel for a free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_service_user(argv: Sequence[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", SERVICE_USER, "--", *argv]
    return list(argv)


def _chown_to_service_user(path: Path) -> None:
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(SERVICE_USER)
    for root, dirs, files in os.walk(path):
        os.chown(root, pw.pw_uid, pw.pw_gid)
        for name in dirs + files:
            os.lchown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)


@dataclass
class LocalCluster:
    """One PostgreSQL cluster in ``base`` (data in ``base/data``, modules in ``base/pylib``)."""

    base: Path
    port: int = field(default_factory=free_port)
    settings: dict[str, str] = field(default_factory=dict)
    #: pg_hba methods for local sockets and TCP (Debian's defaults: "peer", "scram-sha-256")
    auth_local: str = "trust"
    auth_host: str = "trust"
    #: the superuser's password (required when TCP needs one)
    password: str | None = None
    #: Environment of the postmaster (e.g. ``PYTHONPATH`` for a host that has no setting for it).
    env: dict[str, str] = field(default_factory=dict)

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def pylib(self) -> Path:
        return self.base / "pylib"

    @property
    def logfile(self) -> Path:
        return self.base / "postgres.log"

    def dsn(
        self, dbname: str = "postgres", user: str = SERVICE_USER, password: str | None = None
    ) -> str:
        if password is None and user == SERVICE_USER:
            password = self.password
        secret = f" password={password}" if password else ""
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user={user}{secret}"

    def init(self, python_sources: Iterable[Path] = ()) -> None:
        """Create the cluster and copy ``python_sources`` (packages or modules) into pylib."""
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        self.pylib.mkdir(exist_ok=True)
        self.sync_python(python_sources)
        if not (self.datadir / "PG_VERSION").exists():
            auth = [f"--auth-local={self.auth_local}", f"--auth-host={self.auth_host}"]
            if self.password is not None:
                pwfile = self.base / "pwfile"
                pwfile.write_text(self.password + "\n")
                auth.append(f"--pwfile={pwfile}")
            _chown_to_service_user(self.base)
            subprocess.run(
                _as_service_user(
                    [
                        str(PG_BINDIR / "initdb"),
                        "-D",
                        str(self.datadir),
                        *auth,
                        "-U",
                        SERVICE_USER,
                        "-E",
                        "UTF8",
                        "--locale=C.UTF-8",
                        "--no-sync",
                    ]
                ),
                check=True,
                stdout=subprocess.DEVNULL,
            )
            (self.base / "pwfile").unlink(missing_ok=True)
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.base}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "60",
            "shared_buffers": "256MB",
            "log_min_messages": "warning",
            "otelspans.python_path": f"'{self.pylib}'",
            **self.settings,
        }
        with open(self.datadir / "postgresql.auto.conf", "w") as f:
            f.writelines(f"{k} = {v}\n" for k, v in conf.items())
        _chown_to_service_user(self.base)

    def sync_python(self, sources: Iterable[Path]) -> None:
        """Copy modules the backend must import from this working tree (not an installed copy)."""
        for src in sources:
            dest = self.pylib / src.name
            if dest.exists():
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
            if src.is_dir():
                shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, dest)
        _chown_to_service_user(self.pylib)

    def start(self) -> None:
        subprocess.run(
            _as_service_user(
                [
                    *(["env", *(f"{k}={v}" for k, v in self.env.items())] if self.env else []),
                    str(PG_BINDIR / "pg_ctl"),
                    "-D",
                    str(self.datadir),
                    "-l",
                    str(self.logfile),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def stop(self, mode: str = "fast") -> None:
        if not (self.datadir / "postmaster.pid").exists():
            return
        subprocess.run(
            _as_service_user(
                [str(PG_BINDIR / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"]
            ),
            check=False,
            stdout=subprocess.DEVNULL,
        )

    def is_running(self) -> bool:
        r = subprocess.run(
            [str(PG_BINDIR / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
            check=False,
            capture_output=True,
        )
        return r.returncode == 0

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_running():
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL on port {self.port} did not come up")
            time.sleep(0.1)

    def destroy(self) -> None:
        self.stop(mode="immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def server_log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""
