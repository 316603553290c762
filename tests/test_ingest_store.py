"""The object store (local and S3-compatible) and the metadata migrations."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto.server import ThreadedMotoServer

from otelspans_fdw import db
from otelspans_fdw.devcluster import free_port
from otelspans_fdw.exceptions import StoreError
from otelspans_fdw.lake.partitions import LAKE_MIGRATIONS
from otelspans_fdw.objstore import LocalStore, S3Store, open_store


def exercise(store) -> None:
    assert store.put_if_absent("blobs/p/s/b1", b"first")
    assert not store.put_if_absent("blobs/p/s/b1", b"second")  # create-only
    assert store.get("blobs/p/s/b1") == b"first"
    assert store.put_if_absent("blobs/p/s/b2", b"")
    assert store.exists("blobs/p/s/b2") and not store.exists("blobs/p/s/nope")
    assert store.list("blobs") == ["blobs/p/s/b1", "blobs/p/s/b2"]
    assert store.list("views") == []
    assert store.delete("blobs/p/s/b2") and not store.delete("blobs/p/s/b2")
    with pytest.raises(StoreError):
        store.get("blobs/p/s/b2")
    with pytest.raises(StoreError):
        store.put_if_absent("../escape", b"x")
    pq.write_table(
        pa.table({"x": [1, 2]}),
        store.ensure_parent("views/t/a.parquet"),
        filesystem=store.filesystem,
    )
    assert pq.read_table(store.fs_path("views/t/a.parquet"), filesystem=store.filesystem).column(
        "x"
    ).to_pylist() == [1, 2]


def test_local_store(tmp_path) -> None:
    store = open_store(str(tmp_path / "s"))
    assert isinstance(store, LocalStore) and store.root == str(tmp_path / "s")
    exercise(store)
    assert not list((tmp_path / "s").rglob(".tmp-*"))
    assert isinstance(open_store(f"file://{tmp_path}/t", durable=False), LocalStore)


def test_local_store_concurrent_creators_one_wins(tmp_path) -> None:
    store = open_store(str(tmp_path))
    results: list[bool] = []
    threads = [
        threading.Thread(
            target=lambda i=i: results.append(store.put_if_absent("blobs/x", bytes([i]) * 100_000))
        )
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    data = store.get("blobs/x")
    assert len(set(data)) == 1 and len(data) == 100_000  # one whole object, never mixed


def test_s3_store(monkeypatch) -> None:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        for k, v in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(k, v)
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="lake")
        store = open_store(f"s3://lake/otel?endpoint=http://127.0.0.1:{port}")
        assert isinstance(store, S3Store) and store.root == "lake/otel"
        exercise(store)
    finally:
        server.stop()


def test_migrate_idempotent_and_concurrent(fresh_dsn) -> None:
    errors: list[BaseException] = []
    applied: list[int] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        try:
            with db.connect(fresh_dsn) as conn:
                barrier.wait()
                applied.append(db.migrate(conn))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # one of them installed the extension: the metadata and the lake migrations
    assert not errors and sorted(applied) == [0, 0, 0, len(db.MIGRATIONS) + len(LAKE_MIGRATIONS)]
    with psycopg.connect(fresh_dsn) as c:
        assert db.migrate(c) == 0 and db.current_version(c) == db.SCHEMA_VERSION
        idx = {
            r[0]
            for r in c.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'otel_blocks'")
        }
        assert any("(process_id, insert_time)" in i for i in idx)
        assert any("(process_id, begin_time, end_time)" in i for i in idx)
        assert db.status_counts(c)["blocks"] == 0


def test_connect_failure_is_metadata_error() -> None:
    from otelspans_fdw.exceptions import MetadataError

    with pytest.raises(MetadataError):
        db.connect(f"host=127.0.0.1 port={free_port()} connect_timeout=2")


def test_receiver_records_its_store_for_the_wrapper(fresh_dsn: str, tmp_path: Path) -> None:
    """The first receiver's store becomes the default of wrappers with no store option."""
    from otelspans_fdw import backend

    first, second = tmp_path / "first", tmp_path / "second"
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        db.migrate(conn)
        assert db.setting(conn, db.STORE_URL_SETTING) is None
        assert db.record_setting(conn, db.STORE_URL_SETTING, str(first)) == str(first)
        assert db.record_setting(conn, db.STORE_URL_SETTING, str(second)) == str(first)
        assert backend.default_store_url(conn) == str(first)


def test_a_started_receiver_records_its_store(receiver: object, fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        recorded = db.setting(conn, db.STORE_URL_SETTING)
    assert recorded == str(Path(receiver.store).resolve())  # type: ignore[attr-defined]
