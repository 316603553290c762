"""``otelspans ingest FILE...``: OTLP request files through the receiver's own code path.

A file holds one ``ExportTraceServiceRequest``: binary protobuf, or OTLP/JSON (``.json`` or a
body starting with ``{``), optionally gzip-compressed (``.gz`` or the gzip magic number).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psycopg

from otelspans_fdw.ingest.body import DEFAULT_MAX_BODY, decode_content
from otelspans_fdw.ingest.decode import DecodedRequest, decode_request
from otelspans_fdw.ingest.metadata import write_blocks
from otelspans_fdw.objstore import ObjectStore

__all__ = ["FileResult", "ingest_file", "read_request_file"]


@dataclass(frozen=True)
class FileResult:
    path: Path
    blocks: int
    spans: int
    rejected: int


def read_request_file(path: Path, max_body: int = DEFAULT_MAX_BODY) -> DecodedRequest:
    """Decode one request file (no storage)."""
    raw = path.read_bytes()
    gz = raw[:2] == b"\x1f\x8b"
    body = decode_content([raw], "gzip" if gz else "identity", max_body)
    name = path.name.removesuffix(".gz")
    as_json = name.endswith(".json") or body.lstrip()[:1] == b"{"
    return decode_request(body, json_encoded=as_json)


def ingest_file(
    path: Path, store: ObjectStore, conn: psycopg.Connection, max_body: int = DEFAULT_MAX_BODY
) -> FileResult:
    """Store one file's blocks: payloads first, then their rows in one transaction."""
    decoded = read_request_file(path, max_body)
    for b in decoded.blocks:
        store.put_if_absent(b.object_path, b.payload)
    write_blocks(conn, decoded.blocks)
    return FileResult(path, len(decoded.blocks), decoded.nb_spans, decoded.nb_rejected)
