"""Orphan payload cleanup: objects under ``blobs/`` that no ``otel_blocks`` row references.

Orphans appear when a receiver dies between storing a payload and committing its metadata (the
client was not acknowledged and will retry, or gave up).  They are harmless but waste space.
Only objects older than a grace period are removed, so a request in flight (whose payload is
stored but not yet committed) keeps its object; a retry of an old request refreshes the object's
time (see :meth:`otelspans_fdw.objstore.LocalStore.put_if_absent`).  Leftover temporary files of
interrupted local writes are removed too.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import psycopg

from otelspans_fdw.objstore import TMP_PREFIX, ObjectStore

__all__ = ["CleanupResult", "remove_orphans"]

BATCH = 1000


@dataclass(frozen=True)
class CleanupResult:
    scanned: int
    orphans: int
    temp_files: int


def remove_orphans(
    store: ObjectStore, conn: psycopg.Connection, *, grace_seconds: float = 3600.0
) -> CleanupResult:
    """Delete unreferenced payloads and temporary files older than ``grace_seconds``."""
    keys = store.list("blobs")
    now = time.time()

    def old(key: str) -> bool:
        m = store.mtime(key)
        return m is not None and now - m >= grace_seconds

    temp = 0
    candidates: dict[uuid.UUID, str] = {}
    for key in keys:
        name = key.rsplit("/", 1)[-1]
        if name.startswith(TMP_PREFIX):
            if old(key) and store.delete(key):
                temp += 1
            continue
        try:
            candidates[uuid.UUID(name)] = key
        except ValueError:
            continue
    orphans = 0
    ids = list(candidates)
    for i in range(0, len(ids), BATCH):
        chunk = ids[i : i + BATCH]
        known = {
            r[0]
            for r in conn.execute(
                "SELECT block_id FROM otel_blocks WHERE block_id = ANY(%s)", (chunk,)
            )
        }
        for bid in chunk:
            if bid not in known and old(candidates[bid]) and store.delete(candidates[bid]):
                orphans += 1
    return CleanupResult(scanned=len(keys), orphans=orphans, temp_files=temp)
