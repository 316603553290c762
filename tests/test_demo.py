"""`make demo` and `make demo-stop`, run for real: the example queries print results and
stopping leaves nothing running."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from otelspans_fdw.devcluster import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_make_demo_twice_then_stop() -> None:
    base = Path(tempfile.mkdtemp(prefix="otelspans-demo-"))
    os.chmod(base, 0o755)
    env = {
        **os.environ,
        "OTELSPANS_DEMO_DIR": str(base),
        "OTELSPANS_DEMO_PGPORT": str(free_port()),
        "OTELSPANS_DEMO_HTTP_PORT": str(free_port()),
        "OTELSPANS_DEMO_GRPC_PORT": str(free_port()),
        "OTELSPANS_DEMO_SPANS": "3000",
    }
    try:
        first = subprocess.run(
            ["make", "-s", "demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
        )
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        out = first.stdout
        # Latency per process: one row per demo process, all with spans.
        latency = out.split("== Latency per process")[1].split("==")[0]
        rows = re.findall(r"^ (shop/\S+)\s+\|\s+(\S+)\s+\|\s+(\d+) \|", latency, re.M)
        assert len(rows) >= 6 and all(int(n) > 0 for _, _, n in rows)
        assert {exe for exe, _, _ in rows} >= {"shop/frontend", "shop/checkout", "shop/payments"}
        # Errors by span name: the demo traffic has errors.
        errors = out.split("== Errors by span name")[1].split("==")[0]
        assert re.search(r"^ \S.*\|\s+\d+$", errors, re.M)
        # Percentiles per service: p50 <= p95 on every row.
        pct = out.split("== p50 / p95 latency per service")[1].split("==")[0]
        pairs = re.findall(r"^ \w+\s+\|\s+([\d.]+) \|\s+([\d.]+)$", pct, re.M)
        assert len(pairs) >= 6 and all(float(a) <= float(b) for a, b in pairs)
        assert "psql -h 127.0.0.1 -p" in out and "make demo-stop" in out
        # The examples ran as the reader login, which has nothing but the reader grant.
        assert "== Latency per process (as otel_reader)" in out
        assert "-U otel_reader otelspans" in out
        spans_before = int(sum(int(n) for _, _, n in rows))

        second = subprocess.run(
            ["make", "-s", "demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
        )
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        latency2 = second.stdout.split("== Latency per process")[1].split("==")[0]
        rows2 = re.findall(r"^ (shop/\S+)\s+\|\s+(\S+)\s+\|\s+(\d+) \|", latency2, re.M)
        assert sum(int(n) for _, _, n in rows2) > spans_before  # more traffic, same cluster

        stop = subprocess.run(
            ["make", "-s", "demo-stop"], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert stop.returncode == 0, stop.stderr
        assert not (base / "data" / "postmaster.pid").exists()
        assert not (base / "receiver.pid").exists()
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert str(base) not in ps
    finally:
        subprocess.run(
            ["make", "-s", "demo-stop"], cwd=ROOT, env=env, capture_output=True, check=False
        )
        shutil.rmtree(base, ignore_errors=True)
