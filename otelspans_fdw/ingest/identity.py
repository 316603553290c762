"""Deterministic identities: process, stream and block ids are UUIDv5s.

Deterministic ids are what make ingestion idempotent: a retried export, a second receiver or a
receiver restart all compute the same ids, and ``ON CONFLICT DO NOTHING`` does the rest.

* ``process_id`` = uuid5(:data:`PROCESS_NAMESPACE`, key) where key joins the values of
  :data:`PROCESS_KEY_ATTRIBUTES` (in that order; missing -> empty; each value rendered as text,
  trimmed and lower-cased) with the unit separator ``0x1F``.  The list holds what tells one
  running process apart from another (pid, host, ``service.instance.id``, creation time) and
  what describes it (service, runtime, SDK); attributes outside it (say ``deployment.environment``
  added later) do not split a process.
* ``stream_id`` = uuid5(:data:`STREAM_NAMESPACE`, "<process_id>/trace"): one traces stream per
  process.
* ``block_id`` = uuid5(:data:`BLOCK_NAMESPACE`, payload bytes): the same ``ResourceSpans``
  payload is stored once.  The payload embeds the resource, so equal payloads always belong to
  the same process.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping

__all__ = [
    "BLOCK_NAMESPACE",
    "PROCESS_KEY_ATTRIBUTES",
    "PROCESS_NAMESPACE",
    "STREAM_FORMAT",
    "STREAM_NAMESPACE",
    "STREAM_TAGS",
    "block_id",
    "object_path",
    "process_id",
    "process_key",
    "stream_id",
    "uuid5_bytes",
]

PROCESS_NAMESPACE = uuid.UUID("5d0a1c4e-6f1b-5c1e-9a53-0f7e1d2c3b4a")
STREAM_NAMESPACE = uuid.UUID("8b2f3e6a-1c4d-5e7f-8a9b-0c1d2e3f4a5b")
BLOCK_NAMESPACE = uuid.UUID("c3d4e5f6-a7b8-5c9d-8e0f-1a2b3c4d5e6f")

STREAM_TAGS = ["trace"]
STREAM_FORMAT = "otlp/v1/traces"

#: Resource attributes that make up a process identity, in key order.  Never reorder or edit:
#: doing so changes every process id.
PROCESS_KEY_ATTRIBUTES: tuple[str, ...] = (
    "host.id",
    "host.name",
    "host.arch",
    "host.type",
    "host.image.id",
    "host.image.name",
    "os.type",
    "os.description",
    "os.name",
    "os.version",
    "os.build_id",
    "process.pid",
    "process.parent_pid",
    "process.creation.time",
    "process.executable.name",
    "process.executable.path",
    "process.command",
    "process.command_line",
    "process.owner",
    "process.runtime.name",
    "process.runtime.version",
    "process.runtime.description",
    "service.namespace",
    "service.name",
    "service.instance.id",
    "service.version",
    "telemetry.sdk.name",
    "telemetry.sdk.language",
    "telemetry.sdk.version",
    "container.id",
    "k8s.pod.uid",
)


def uuid5_bytes(namespace: uuid.UUID, name: bytes) -> uuid.UUID:
    """RFC 4122 version-5 UUID of raw bytes (``uuid.uuid5`` takes only str before 3.12)."""
    digest = hashlib.sha1(namespace.bytes + name, usedforsecurity=False).digest()
    return uuid.UUID(bytes=digest[:16], version=5)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip().lower()


def process_key(attributes: Mapping[str, object]) -> str:
    """The documented identity key of a resource (plain Python attribute values)."""
    return "\x1f".join(_text(attributes.get(k)) for k in PROCESS_KEY_ATTRIBUTES)


def process_id(attributes: Mapping[str, object]) -> uuid.UUID:
    """The process id of a resource with these attributes."""
    return uuid.uuid5(PROCESS_NAMESPACE, process_key(attributes))


def stream_id(pid: uuid.UUID) -> uuid.UUID:
    """The traces stream of a process."""
    return uuid.uuid5(STREAM_NAMESPACE, f"{pid}/trace")


def block_id(payload: bytes) -> uuid.UUID:
    """The block id of a serialized ``ResourceSpans`` payload."""
    return uuid5_bytes(BLOCK_NAMESPACE, payload)


def object_path(pid: uuid.UUID, sid: uuid.UUID, bid: uuid.UUID) -> str:
    """Where a block's payload lives in the object store."""
    return f"blobs/{pid}/{sid}/{bid}"
