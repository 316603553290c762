"""What the container images run is what the tests run: the scripts under scripts/ and the
Makefile targets named in docker/."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import psycopg

from otelspans_fdw.devcluster import PG_BINDIR, LocalCluster, free_port

ROOT = Path(__file__).resolve().parent.parent


def as_postgres(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run(
        [*prefix, "env", *(f"{k}={v}" for k, v in env.items()), *argv],
        check=True,
        capture_output=True,
        text=True,
    )


def test_pg_init_script_initialises_once_with_the_extension() -> None:
    base = Path(tempfile.mkdtemp(prefix="otelspans-pginit-"))
    os.chmod(base, 0o777)
    datadir = base / "data"
    port = free_port()
    env = {"PGPORT": str(port), "OTELSPANS_LISTEN": "127.0.0.1"}
    script = str(ROOT / "scripts" / "pg-init.sh")
    try:
        first = as_postgres([script, str(datadir)], env)
        assert "initialised" in first.stdout
        again = as_postgres([script, str(datadir)], env)
        assert "already holds a cluster" in again.stdout
        as_postgres(
            [str(PG_BINDIR / "pg_ctl"), "-D", str(datadir), "-l", str(base / "log"), "-w", "start"],
            env,
        )
        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres") as c:
            ext = c.execute("SELECT extname FROM pg_extension WHERE extname = 'otelspans'")
            assert ext.fetchall() == [("otelspans",)]
    finally:
        LocalCluster(base, port=port).destroy()


def test_docker_files_use_only_tested_targets_and_scripts() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    make_targets = set(re.findall(r"make -C /src (\S+)", dockerfile))
    makefile = (ROOT / "Makefile").read_text()
    assert make_targets == {"install"}
    assert "\ninstall:" in makefile and "\ntest: install" in makefile
    entry = (ROOT / "docker" / "entrypoint.sh").read_text()
    for script in re.findall(r"/src/(scripts/\S+)", entry):
        assert (ROOT / script).exists()
        assert script == "scripts/pg-init.sh"  # exercised above
