"""The OTLP rules, written once: what the receiver accepts is exactly what the lake decodes.

The receiver (:mod:`otelspans_fdw.ingest.decode`) counts spans as accepted or rejected and
builds process rows with these functions; the lake (:mod:`otelspans_fdw.lake.decode`) skips the
same spans and renders the same values with them (its columnar path applies the same rules as
Arrow kernels and is tested against them).  PostgreSQL stores both sides' output, so every
rule also answers "can ``text``/``jsonb`` hold this?".

Span validity (a rejected span is reported in OTLP ``partial_success``, kept in its block's
payload, and never becomes a row):

* ``trace_id`` must be 16 bytes and ``span_id`` 8 bytes, and neither all zero (the OTLP
  specification calls all-zero ids invalid);
* ``start_time_unix_nano`` and ``end_time_unix_nano`` must be non-zero and below 2^63 ns (year
  2262: PostgreSQL's ``bigint`` and ``timestamptz`` end there), and the end must not be before
  the start (a negative duration would break overlap scans of ``start_time``/``end_time``).

``parent_span_id`` other than 8 non-zero bytes means "no parent" (a root), as in the spec.

Values (``AnyValue`` to JSON):

* strings, keys included: U+0000 (which neither ``text`` nor ``jsonb`` can hold) and lone
  surrogates (which have no UTF-8 form; only OTLP/JSON can carry them) become U+FFFD;
* doubles: NaN, +Inf and -Inf become the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
  (protobuf's JSON mapping; JSON has no such numbers);
* bytes: base64; arrays and kvlists recursively; an absent value (or a kind newer than this
  code): null;
* repeated keys in one attribute list: the last one wins (as ``jsonb`` does), compared after
  the replacements above (so ``"k\\0"`` and ``"k\\uFFFD"`` are one key);
* span ``properties``: the span's own attributes win over the ``otel.scope.*`` keys derived
  from its scope (the more specific value).

Kind and status names come from the protobuf enums (``SPAN_KIND_SERVER`` -> ``SERVER``);
numbers the enums do not know are ``UNSPECIFIED`` / ``UNSET``.
"""

from __future__ import annotations

import base64
import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

__all__ = [
    "KINDS",
    "MAX_TIME_NS",
    "SPAN_ID_LEN",
    "STATUSES",
    "TRACE_ID_LEN",
    "ProcessInfo",
    "anyvalue_to_json",
    "attributes_to_dict",
    "clean_text",
    "json_double",
    "parent_or_none",
    "process_info",
    "span_rejection",
    "valid_span_id",
    "valid_trace_id",
]

TRACE_ID_LEN = 16
SPAN_ID_LEN = 8
ZERO_TRACE_ID = b"\0" * TRACE_ID_LEN
ZERO_SPAN_ID = b"\0" * SPAN_ID_LEN
#: Span times must be below this (2^63 ns): the range of ``bigint``.
MAX_TIME_NS = 1 << 63


def _enum_names(enum: Any, prefix: str) -> tuple[str, ...]:
    by_number = {v: k.removeprefix(prefix) for k, v in enum.items()}
    return tuple(by_number[i] for i in range(len(by_number)))


KINDS: tuple[str, ...] = _enum_names(Span.SpanKind, "SPAN_KIND_")
STATUSES: tuple[str, ...] = _enum_names(Status.StatusCode, "STATUS_CODE_")

# --- ids and times -------------------------------------------------------------------------


def valid_trace_id(tid: bytes) -> bool:
    return len(tid) == TRACE_ID_LEN and tid != ZERO_TRACE_ID


def valid_span_id(sid: bytes) -> bool:
    return len(sid) == SPAN_ID_LEN and sid != ZERO_SPAN_ID


def parent_or_none(parent: bytes) -> bytes | None:
    """The parent span id, or None for a root (absent, wrong length or all zero)."""
    return parent if valid_span_id(parent) else None


def span_rejection(trace_id: bytes, span_id: bytes, start_ns: int, end_ns: int) -> str | None:
    """Why a span is rejected (a short reason), or None when it is valid."""
    if not valid_trace_id(trace_id):
        return "invalid trace_id"
    if not valid_span_id(span_id):
        return "invalid span_id"
    if not start_ns or not end_ns:
        return "zero start or end time"
    if start_ns >= MAX_TIME_NS or end_ns >= MAX_TIME_NS:
        return "time beyond 2^63 ns"
    if end_ns < start_ns:
        return "end time before start time"
    return None


# --- values ----------------------------------------------------------------------------------

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def clean_text(text: str) -> str:
    """``text`` with U+0000 and lone surrogates replaced by U+FFFD (see the module docstring)."""
    if _UNSTORABLE.search(text) is None:
        return text
    return _UNSTORABLE.sub("\ufffd", text)


def json_double(x: float) -> float | str:
    if math.isfinite(x):
        return x
    return "NaN" if x != x else ("Infinity" if x > 0 else "-Infinity")


def anyvalue_to_json(v: Any) -> Any:
    """An OTLP ``AnyValue`` as a JSON-able Python value that PostgreSQL can store."""
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return clean_text(v.string_value)
    if kind == "int_value":
        return v.int_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "double_value":
        return json_double(v.double_value)
    if kind is None:
        return None
    if kind == "array_value":
        return [anyvalue_to_json(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes_to_dict(v.kvlist_value.values)
    if kind == "bytes_value":
        return base64.b64encode(v.bytes_value).decode("ascii")
    return None  # a value kind newer than this code


def attributes_to_dict(kvs: Sequence[Any]) -> dict[str, Any]:
    """A repeated ``KeyValue`` as a dict (cleaned keys; the last duplicate wins)."""
    out: dict[str, Any] = {}
    for kv in kvs:
        out[clean_text(kv.key)] = anyvalue_to_json(kv.value)
    return out


# --- the process row -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """The ``otel_processes`` row of a resource (first write wins in the database)."""

    process_id: uuid.UUID
    exe: str | None
    username: str | None
    computer: str | None
    distro: str | None
    service_name: str | None
    start_time_ns: int | None  # from process.creation.time; None -> the first block's begin
    properties: dict[str, Any]


def _parse_time_ns(value: Any) -> int | None:
    """``process.creation.time``: ISO 8601 text (semantic conventions) or integer ns.

    Out of the span time range (see :data:`MAX_TIME_NS`) counts as absent.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 0 < value < MAX_TIME_NS else None
    if isinstance(value, str) and value.strip():
        try:
            dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
        if dt.tzinfo is None:
            return None
        ns = int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000
        return ns if 0 < ns < MAX_TIME_NS else None
    return None


def _first(attrs: dict[str, Any], *keys: str) -> str | None:
    for k in keys:
        v = attrs.get(k)
        if v not in (None, ""):
            return str(v)
    return None


def process_info(attrs: dict[str, Any]) -> ProcessInfo:
    """The process row of a resource, from :func:`attributes_to_dict` of its attributes.

    The process id folds case (see :mod:`otelspans_fdw.ingest.identity`); the other fields
    keep the text of the first resource seen.
    """
    # Imported here: the ingest package imports this module while it initialises.
    from otelspans_fdw.ingest import identity

    name = _first(attrs, "service.name")
    ns = _first(attrs, "service.namespace")
    exe = f"{ns}/{name}" if ns and name else name
    return ProcessInfo(
        process_id=identity.process_id(attrs),
        exe=exe,
        username=_first(attrs, "process.owner", "process.user.name", "user.name"),
        computer=_first(attrs, "host.name"),
        distro=_first(attrs, "os.description"),
        service_name=name,
        start_time_ns=_parse_time_ns(attrs.get("process.creation.time")),
        properties={f"otel.resource.{k}": v for k, v in attrs.items()},
    )
