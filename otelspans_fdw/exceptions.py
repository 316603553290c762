"""Every error otelspans raises on purpose, under one base class.

Each class carries the SQLSTATE that the PostgreSQL host reports when the error escapes a
wrapper callback, so a user in psql sees a proper ``ERROR`` (with ``HINT`` where we have one)
instead of a Python traceback.
"""

from __future__ import annotations


class OtelSpansError(Exception):
    """Base class of the errors otelspans raises on purpose."""

    sqlstate = "XX000"

    def __init__(self, message: str, *, hint: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.hint = hint
        self.detail = detail


class InvalidQueryError(OtelSpansError):
    """The query cannot be answered as written (for example no process_id qual)."""

    sqlstate = "22023"


class InvalidArgumentError(OtelSpansError, ValueError):
    """A function argument or option value is malformed or out of range (still a ValueError,
    for the callers that validate with ``except ValueError``)."""

    sqlstate = "22023"


class ConfigurationError(OtelSpansError):
    """A server, table or command-line option is missing or malformed."""

    sqlstate = "HV00D"


class StoreError(OtelSpansError):
    """The object store failed or holds something unexpected."""

    sqlstate = "58030"


class MetadataError(OtelSpansError):
    """The metadata database is unreachable or inconsistent."""

    sqlstate = "08006"


class DecodeError(OtelSpansError):
    """A payload is not valid OTLP."""

    sqlstate = "22P02"


class RejectedDataError(DecodeError):
    """A request decoded, but the database refuses its rows: a retry would fail the same way."""

    sqlstate = "22000"


class PayloadTooLargeError(DecodeError):
    """A request body is over the size limit, before or after decompression."""

    sqlstate = "54000"


class UnsupportedMediaTypeError(DecodeError):
    """A request uses a content type or content encoding the receiver does not accept."""

    sqlstate = "0A000"


class RequestTimeoutError(OtelSpansError):
    """A client took longer than the receiver's deadline to send its request."""

    sqlstate = "57014"


class AuthenticationError(OtelSpansError):
    """A request lacks the bearer token the receiver is configured to require."""

    sqlstate = "28000"


class OverloadedError(OtelSpansError):
    """The receiver has too much work in flight and refuses more for now."""

    sqlstate = "53000"
