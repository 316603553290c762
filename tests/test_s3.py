"""S3 end to end against a real S3-compatible server (moto's server mode) on loopback.

The receiver writes payloads to ``s3://`` with the usual ``AWS_*`` variables; PostgreSQL (whose
server process has no such variables) reads them with the endpoint on the foreign server and the
credentials in a *user mapping*; the Iceberg warehouse lives in the same bucket and is read back
with pyiceberg.  Roles without a mapping get a clear error, and no role but a
superuser can read the secret from the catalogs.
"""

from __future__ import annotations

import argparse
import io
import json
import uuid
from collections.abc import Iterator
from contextlib import redirect_stdout

import boto3
import psycopg
import pytest
from ingest_helpers import make_request
from moto.server import ThreadedMotoServer
from psycopg import errors, sql

from otelspans_fdw.cli_maintenance import add_publish
from otelspans_fdw.devcluster import LocalCluster, free_port
from otelspans_fdw.exceptions import ConfigurationError
from otelspans_fdw.lake.publish import NAMESPACE, catalog_for
from otelspans_fdw.objstore import S3Store, store_from_options

# moto keeps buckets per process: a bucket of our own, whatever other tests put in theirs.
BUCKET = f"lake-{uuid.uuid4().hex[:12]}"
KEY_ID = "AKIDOTELSPANSTEST"


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port with an empty bucket."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key="x",
            region_name="us-east-1",
        ).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()


def keys(endpoint: str, prefix: str) -> list[str]:
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key="x",
        region_name="us-east-1",
    )
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_store_from_options_reads_mapping_options_and_requires_keys(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    base = {
        "store": f"s3://{BUCKET}/unit",
        "aws_endpoint_url": s3_endpoint,
        "aws_region": "us-east-1",
    }
    with pytest.raises(ConfigurationError) as e:
        store_from_options(base)
    assert "no S3 credentials" in str(e.value) and "CREATE USER MAPPING" in (e.value.hint or "")
    with pytest.raises(ConfigurationError, match="aws_credentials"):
        store_from_options({**base, "aws_credentials": "sometimes"})
    opts = {**base, "aws_access_key_id": KEY_ID, "aws_secret_access_key": "s1"}
    store = store_from_options(opts)
    assert isinstance(store, S3Store) and store.url == f"s3://{BUCKET}/unit"
    assert store.put_if_absent("blobs/x", b"payload") and store.get("blobs/x") == b"payload"
    assert store_from_options(dict(opts)) is store  # cached per configuration
    assert store_from_options({**opts, "aws_secret_access_key": "s2"}) is not store
    props = store.iceberg_properties()
    assert props["s3.endpoint"] == s3_endpoint and props["s3.secret-access-key"] == "s1"
    assert "s1" not in repr(store)


def post(url: str, body: bytes) -> int:
    import urllib.request

    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/x-protobuf"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return int(r.status)


def publish_cli(*argv: str) -> dict:
    parser = argparse.ArgumentParser(prog="otelspans")
    add_publish(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["publish", *argv])
    out = io.StringIO()
    with redirect_stdout(out):
        assert args.func(args) == 0
    return json.loads(out.getvalue())


SERVICE_COUNTS_SQL = (
    "SELECT p.service_name, count(*) FROM otel_processes p JOIN otel_spans s USING (process_id)"
    " GROUP BY 1 ORDER BY 1"
)


def test_s3_ingest_query_publish_with_secrets_in_user_mappings(
    pg: LocalCluster,
    fresh_dsn: str,
    receiver_factory,
    s3_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "secret-" + uuid.uuid4().hex
    # The receiver (a subprocess) and this process use the AWS variables; the PostgreSQL
    # server was started before they were set and never sees them.
    for k, v in {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    url = f"s3://{BUCKET}/otel"
    cli_url = f"{url}?endpoint={s3_endpoint}"
    receiver = receiver_factory(store=cli_url)
    for i, svc in enumerate(["cart", "pay", "ship"]):
        body = make_request(5 + i, service=svc, pid=10 + i, seed=i).SerializeToString()
        assert post(receiver.http_url, body) == 200
    assert len(keys(s3_endpoint, "otel/blobs/")) == 3

    conn = psycopg.connect(fresh_dsn, autocommit=True)
    conn.execute("CREATE EXTENSION IF NOT EXISTS otelspans")
    conn.execute(
        sql.SQL(
            "ALTER SERVER otel_spans_server OPTIONS (ADD store {}, ADD aws_endpoint_url {},"
            " ADD aws_region 'us-east-1')"
        ).format(url, s3_endpoint)
    )
    conn.execute(
        "CREATE USER MAPPING FOR CURRENT_USER SERVER otel_spans_server"
        f" OPTIONS (aws_access_key_id '{KEY_ID}', aws_secret_access_key '{secret}')"
    )
    want = [("cart", 5), ("pay", 6), ("ship", 7)]
    assert conn.execute(SERVICE_COUNTS_SQL).fetchall() == want
    parquet_keys = keys(s3_endpoint, "otel/views/")
    assert len(parquet_keys) == 3 and all(k.endswith(".parquet") for k in parquet_keys)

    # Iceberg, warehouse in the same bucket: published from SQL (credentials of the mapping).
    assert json.loads(conn.execute("SELECT otel_publish()::text").fetchone()[0])["added"] == 3
    assert any(k.endswith(".metadata.json") for k in keys(s3_endpoint, "otel/iceberg/"))
    # More traffic, published by the CLI (credentials from the AWS variables).
    body = make_request(4, service="mail", pid=20).SerializeToString()
    assert post(receiver.http_url, body) == 200
    want.insert(1, ("mail", 4))
    assert conn.execute(SERVICE_COUNTS_SQL).fetchall() == want
    assert publish_cli("--dsn", fresh_dsn, "--store", cli_url)["added"] == 1

    store = store_from_options(
        {
            "store": url,
            "aws_endpoint_url": s3_endpoint,
            "aws_region": "us-east-1",
            "aws_access_key_id": KEY_ID,
            "aws_secret_access_key": secret,
        }
    )
    table = catalog_for(fresh_dsn, store).load_table((NAMESPACE, "otel_spans"))
    arrow = table.scan(selected_fields=("span_id", "exe")).to_arrow()
    span_ids = {
        r[0]
        for r in conn.execute(
            "SELECT span_id FROM otel_spans s JOIN otel_processes p USING (process_id)"
        )
    }
    assert arrow.num_rows == 22 and set(arrow.column("span_id").to_pylist()) == span_ids
    files = [t.file.file_path for t in table.scan().plan_files()]
    assert len(files) == 4 and all(f.startswith(f"{url}/views/") for f in files)

    # Retention from SQL reaches the same store (nothing is old enough: all is kept).
    kept = json.loads(conn.execute("SELECT otel_retention('1 day')::text").fetchone()[0])
    assert kept["blocks"] == kept["iceberg_files_removed"] == 0 and kept["cut"]
    assert len(keys(s3_endpoint, "otel/blobs/")) == 4

    # Roles: one with its own mapping, one without.
    alice, bob, carol = (f"{n}_{uuid.uuid4().hex[:6]}" for n in ("alice", "bob", "carol"))
    try:
        for role in (alice, bob):
            # Plain grants: pg_read_all_data would let the role read pg_user_mapping itself.
            conn.execute(f"CREATE ROLE {role} LOGIN")
            conn.execute(f"GRANT CREATE ON SCHEMA public TO {role}")
            conn.execute(
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"
            )
            # USAGE lets a role see its own mapping's options, never another role's.
            conn.execute(f"GRANT USAGE ON FOREIGN SERVER otel_spans_server TO {role}")
        conn.execute(
            f"CREATE USER MAPPING FOR {alice} SERVER otel_spans_server"
            f" OPTIONS (aws_access_key_id '{KEY_ID}', aws_secret_access_key 'alice-own')"
        )
        with psycopg.connect(pg.dsn(conn.info.dbname, user=alice), autocommit=True) as c:
            assert c.execute(SERVICE_COUNTS_SQL).fetchall() == want
            seen = [
                c.execute(f"SELECT to_jsonb(t)::text FROM {view} t").fetchall()
                for view in (
                    "pg_foreign_server",
                    "information_schema.foreign_server_options",
                    "pg_user_mappings",
                    "information_schema.user_mapping_options",
                    "information_schema.foreign_table_options",
                )
            ]
            text = json.dumps(seen)
            assert s3_endpoint in text  # the server options are visible...
            assert "alice-own" in text  # ...and her own mapping...
            assert secret not in text  # ...but never the superuser's secret
            with pytest.raises(errors.InsufficientPrivilege):
                c.execute("SELECT umoptions FROM pg_user_mapping")
        with psycopg.connect(pg.dsn(conn.info.dbname, user=bob), autocommit=True) as c:
            with pytest.raises(psycopg.Error) as e:
                c.execute(SERVICE_COUNTS_SQL)
            diag = e.value.diag
            assert f"no S3 credentials for object store s3://{BUCKET}/otel" in str(
                diag.message_primary
            )
            assert "CREATE USER MAPPING FOR <role> SERVER otel_spans_server" in str(
                diag.message_hint
            )
        # The lake's keys in a mapping FOR PUBLIC: a reader with the one grant and no mapping
        # of its own queries, and cannot read them.
        conn.execute(
            "CREATE USER MAPPING FOR PUBLIC SERVER otel_spans_server"
            f" OPTIONS (aws_access_key_id '{KEY_ID}', aws_secret_access_key '{secret}')"
        )
        conn.execute(f"CREATE ROLE {carol} LOGIN")
        conn.execute(f"GRANT otelspans_reader TO {carol}")
        with psycopg.connect(pg.dsn(conn.info.dbname, user=carol), autocommit=True) as c:
            assert c.execute(SERVICE_COUNTS_SQL).fetchall() == want
            shown = c.execute("SELECT to_jsonb(m)::text FROM pg_user_mappings m").fetchall()
            assert secret not in json.dumps(shown)
    finally:
        conn.execute("DROP USER MAPPING IF EXISTS FOR PUBLIC SERVER otel_spans_server")
        conn.execute(f"DROP OWNED BY {alice}, {bob}")
        conn.execute(f"DROP ROLE IF EXISTS {alice}, {bob}, {carol}")
        conn.close()
