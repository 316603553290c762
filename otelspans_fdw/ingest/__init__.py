"""OTLP trace ingestion: transports (HTTP, gRPC), I/O-free decoding, identity, storage.

Modules: :mod:`.decode` (requests -> blocks, no I/O), :mod:`.identity` (UUIDv5 ids),
:mod:`.body` (limits, gzip), :mod:`.auth` (bearer token), :mod:`.metadata` (row writes),
:mod:`.groupcommit` (shared transactions), :mod:`.pipeline` (admission, store-then-commit),
:mod:`.http` and :mod:`.grpc_service` (transports), :mod:`.server` (the receiver process),
:mod:`.files` (``otelspans ingest FILE``), :mod:`.cleanup` (orphan payloads),
:mod:`.demo` (``otelspans generate`` traffic), :mod:`.metrics` (Prometheus ``/metrics``),
:mod:`.scrape` (``otelspans status --receiver``).
"""

from __future__ import annotations

from otelspans_fdw.ingest.decode import Block, DecodedRequest, decode_request, split_blocks
from otelspans_fdw.ingest.identity import block_id, object_path, process_id, stream_id

__all__ = [
    "Block",
    "DecodedRequest",
    "block_id",
    "decode_request",
    "object_path",
    "process_id",
    "split_blocks",
    "stream_id",
]
