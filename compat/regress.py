"""multicorn2's own regression SQL through both hosts: how many of its files pass.

    python compat/regress.py SRC [--only ours|multicorn2] [--keep]

SRC is a multicorn2 source tree; its ``test-3.11`` files are run with PostgreSQL's
``pg_regress``, each file in a fresh database of one throwaway cluster, once under multicorn2
(as written) and once under our host with only the extension and wrapper names mapped
(``CREATE EXTENSION multicorn`` -> ``otelspans``, ``FOREIGN DATA WRAPPER multicorn`` ->
``otelspans_fdw``), in the SQL and in the expected output alike.  Nothing of SRC is copied
into this repository: the mapped copies live in a temporary directory.

Needs the environment ``scripts/check-multicorn2.sh`` sets up (multicorn2 built into the
PostgreSQL copy named by ``OTELSPANS_PG_BINDIR``, ``MULTICORN2_PYTHONPATH``).  Prints one line
per file and host and the totals; a file passes when its output equals one of the expected
files (``NAME.out``, ``NAME_1.out``...), as pg_regress decides.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from otelspans_fdw.devcluster import PG_BINDIR, LocalCluster  # noqa: E402

_EXTENSION = r"\b(EXTENSION\s+(?:IF\s+(?:NOT\s+)?EXISTS\s+)?)multicorn\b"
_MAPPING = [
    (re.compile(_EXTENSION, re.I), r"\1otelspans"),
    (re.compile(r"\b(DATA\s+WRAPPER\s+)multicorn\b", re.I), r"\1otelspans_fdw"),
]


def map_names(text: str) -> str:
    for pattern, repl in _MAPPING:
        text = pattern.sub(repl, text)
    return text


def prepare(src: Path, work: Path, mapped: bool) -> Path:
    """A copy of the test tree (sql, expected, test-common), names mapped for our host."""
    out = work / ("ours" if mapped else "multicorn2")
    for sub in ("test-3.11/sql", "test-3.11/expected", "test-common"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / sub).iterdir()):
            text = f.read_text(errors="surrogateescape")
            (out / sub / f.name).write_text(
                map_names(text) if mapped else text, errors="surrogateescape"
            )
    (out / "results").mkdir(exist_ok=True)
    shutil.chown(out, "postgres") if os.geteuid() == 0 else None
    subprocess.run(["chmod", "-R", "a+rwX", str(work)], check=True)
    return out


def pg_regress() -> Path:
    pkglib = subprocess.run(
        [str(PG_BINDIR / "pg_config"), "--pkglibdir"], check=True, capture_output=True, text=True
    ).stdout.strip()
    return Path(pkglib) / "pgxs/src/test/regress/pg_regress"


def run_file(cluster: LocalCluster, tree: Path, name: str) -> bool:
    db = "regress_" + re.sub(r"\W", "_", name)
    with psycopg.connect(cluster.dsn(), autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{db}" TEMPLATE template0')
    argv = [
        str(pg_regress()),
        "--use-existing",
        f"--bindir={PG_BINDIR}",
        "--inputdir=test-3.11",
        f"--outputdir={tree / 'results'}",
        "--host=127.0.0.1",
        f"--port={cluster.port}",
        "--user=postgres",
        f"--dbname={db}",
        name,
    ]
    env = {**os.environ, "PGUSER": "postgres"}
    r = subprocess.run(argv, cwd=tree, capture_output=True, text=True, env=env, check=False)
    diffs = tree / "results" / "regression.diffs"
    if diffs.exists():
        diffs.rename(tree / "results" / f"{name}.diffs")
    with psycopg.connect(cluster.dsn(), autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    return r.returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path)
    ap.add_argument("--only", choices=["ours", "multicorn2"])
    ap.add_argument("--keep", action="store_true", help="keep the results (diffs) directory")
    args = ap.parse_args()
    src = args.src.resolve()
    mcpath = os.environ.get("MULTICORN2_PYTHONPATH") or str(src / "python")
    names = sorted(p.stem for p in (src / "test-3.11" / "sql").glob("*.sql"))
    work = Path(tempfile.mkdtemp(prefix="otelspans-regress-"))
    os.chmod(work, 0o755)
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    cluster = LocalCluster(
        work / "cluster",
        # multicorn2's wrappers (multicorn.testfdw...) come from its package on both hosts.
        settings={"otelspans.python_path": f"'{mcpath}'"},
        env={"PYTHONPATH": f"{mcpath}:{site / 'site-packages'}"},
    )
    cluster.init([])
    cluster.start()
    totals: dict[str, int] = {}
    try:
        hosts = [args.only] if args.only else ["multicorn2", "ours"]
        for host in hosts:
            tree = prepare(src, work, mapped=host == "ours")
            passed = 0
            for name in names:
                ok = run_file(cluster, tree, name)
                passed += ok
                print(f"{host:10} {name:32} {'ok' if ok else 'FAILED'}", flush=True)
            totals[host] = passed
    finally:
        cluster.destroy()
        if args.keep:
            print(f"results kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    for host, passed in totals.items():
        print(f"{host}: {passed} of {len(names)} files pass")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
