"""Receiver restarts and SIGKILL: acknowledged spans survive, metadata never dangles."""

from __future__ import annotations

import signal
import threading
import urllib.error
import urllib.request

import psycopg
from ingest_helpers import block_rows, make_request, stored_payloads
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from otelspans_fdw.ingest import identity
from otelspans_fdw.ingest.cleanup import remove_orphans
from otelspans_fdw.ingest.decode import decode_request
from otelspans_fdw.loadgen import traffic
from otelspans_fdw.objstore import open_store

RESOURCE = {
    "service.name": "billing",
    "process.pid": 4242,
    "host.name": "h1",
    "service.instance.id": "billing-1",
}


def export_one(target: str, name: str) -> None:
    tp = TracerProvider(resource=Resource(RESOURCE))
    tp.add_span_processor(SimpleSpanProcessor(GrpcExporter(endpoint=target, insecure=True)))
    with tp.get_tracer("t").start_as_current_span(name):
        pass
    tp.shutdown()


def test_restart_keeps_process_ids(receiver_factory) -> None:
    r1 = receiver_factory()
    export_one(r1.grpc_target, "before")
    r1.stop()
    r2 = receiver_factory()
    export_one(r2.grpc_target, "after")
    with psycopg.connect(r2.dsn) as c:
        pids = c.execute("SELECT process_id FROM otel_processes").fetchall()
        per_block = c.execute("SELECT DISTINCT process_id FROM otel_blocks").fetchall()
        streams = c.execute("SELECT count(*) FROM otel_streams").fetchone()[0]
    assert pids == per_block == [(identity.process_id(RESOURCE),)]
    assert streams == 1 and len(block_rows(r2.dsn)) == 2


def test_sigkill_while_clients_send(receiver_factory) -> None:
    model = traffic.TraceModel(seed=11, processes=6, base_time_ns=1_750_000_000 * 10**9)
    bodies = traffic.encode_requests(model, 60_000, 100)
    acked: set[int] = set()
    lock = threading.Lock()
    r1 = receiver_factory()
    killed = threading.Event()

    def client(k: int) -> None:
        for i in range(k, len(bodies), 4):
            req = urllib.request.Request(
                r1.http_url,
                data=bodies[i],
                method="POST",
                headers={"Content-Type": "application/x-protobuf"},
            )
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    ok = resp.status == 200
            except (urllib.error.URLError, ConnectionError, OSError):
                ok = False
            if ok:
                with lock:
                    acked.add(i)
                    if len(acked) == 40:
                        r1.proc.send_signal(signal.SIGKILL)
                        killed.set()
            elif killed.is_set():
                return

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r1.proc.wait(timeout=10)
    assert r1.proc.returncode == -signal.SIGKILL and 40 <= len(acked) < len(bodies)

    r2 = receiver_factory()
    rows = {str(r[0]): r for r in block_rows(r2.dsn)}
    for i in acked:  # every acknowledged span is there
        for b in decode_request(bodies[i]).blocks:
            assert str(b.block_id) in rows and rows[str(b.block_id)][2] == b.nb_spans
    stored = stored_payloads(r2.store)
    for bid, _pid, _nb, _rej, size, path in rows.values():  # metadata never dangles
        assert path in stored and len(stored[path]) == size
        assert identity.block_id(stored[path]) == bid
    with psycopg.connect(r2.dsn) as conn:
        result = remove_orphans(open_store(str(r2.store)), conn, grace_seconds=0)
    after = stored_payloads(r2.store)
    assert set(after) == {r[5] for r in rows.values()}
    assert result.orphans == len(stored) - len(rows)
    assert not [p for p in r2.store.rglob(".tmp-*")]

    # the clients' retries complete the data set on the restarted receiver
    for i in sorted(set(range(len(bodies))) - acked):
        req = urllib.request.Request(
            r2.http_url,
            data=bodies[i],
            method="POST",
            headers={"Content-Type": "application/x-protobuf"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200
    with psycopg.connect(r2.dsn) as c:
        total = c.execute("SELECT sum(nb_spans) FROM otel_blocks").fetchone()[0]
    assert total == sum(decode_request(b).nb_spans for b in bodies)


def test_cleanup_keeps_recent_and_referenced_payloads(receiver, tmp_path) -> None:
    body = make_request(2).SerializeToString()
    urllib.request.urlopen(
        urllib.request.Request(
            receiver.http_url, data=body, headers={"Content-Type": "application/x-protobuf"}
        ),
        timeout=30,
    ).read()
    store = open_store(str(receiver.store))
    orphan = make_request(3, seed=9)
    ob = decode_request(orphan.SerializeToString()).blocks[0]
    store.put_if_absent(ob.object_path, ob.payload)  # as if the receiver died before commit
    with psycopg.connect(receiver.dsn) as conn:
        assert remove_orphans(store, conn, grace_seconds=3600).orphans == 0  # too recent
        assert remove_orphans(store, conn, grace_seconds=0).orphans == 1
    assert set(stored_payloads(receiver.store)) == {r[5] for r in block_rows(receiver.dsn)}
