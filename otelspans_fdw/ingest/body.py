"""Request bodies: size limits, content types and bounded gzip decompression (no I/O).

The limit applies twice: to the bytes on the wire and to the decompressed body.  Decompression
is streamed with ``max_length`` so a gzip bomb costs at most ``limit`` bytes of memory before it
is refused, never its full expanded size.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

from otelspans_fdw.exceptions import (
    DecodeError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)

__all__ = [
    "DEFAULT_MAX_BODY",
    "JSON_TYPES",
    "PROTOBUF_TYPES",
    "GzipDecoder",
    "decode_content",
    "is_json_content_type",
]

DEFAULT_MAX_BODY = 20 * 1024 * 1024
PROTOBUF_TYPES = frozenset({"application/x-protobuf", "application/protobuf"})
JSON_TYPES = frozenset({"application/json"})


def is_json_content_type(mimetype: str) -> bool:
    """True for OTLP/JSON, False for protobuf; :class:`UnsupportedMediaTypeError` otherwise."""
    mt = mimetype.split(";", 1)[0].strip().lower()
    if mt in PROTOBUF_TYPES:
        return False
    if mt in JSON_TYPES:
        return True
    raise UnsupportedMediaTypeError(
        f"unsupported content type {mimetype or '(none)'!r}",
        hint="Send application/x-protobuf or application/json.",
    )


def _too_large(limit: int, what: str) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"request body {what} is over the limit of {limit} bytes")


class GzipDecoder:
    """Incremental gzip decompression that refuses to produce more than ``limit`` bytes."""

    def __init__(self, limit: int):
        self.limit = limit
        self._d = zlib.decompressobj(wbits=31)
        self._parts: list[bytes] = []
        self._size = 0

    def _take(self, out: bytes) -> None:
        self._size += len(out)
        if self._size > self.limit:
            raise _too_large(self.limit, "after decompression")
        self._parts.append(out)

    def feed(self, chunk: bytes) -> None:
        """Decompress one chunk of the compressed stream."""
        data = chunk
        try:
            while data:
                out = self._d.decompress(data, self.limit - self._size + 1)
                self._take(out)
                if self._d.eof:
                    data = self._d.unused_data
                    if data:  # concatenated gzip members
                        self._d = zlib.decompressobj(wbits=31)
                    continue
                data = self._d.unconsumed_tail
        except zlib.error as e:
            raise DecodeError(f"malformed gzip body: {e}") from e

    def finish(self) -> bytes:
        """The whole decompressed body; :class:`DecodeError` if the stream was cut short."""
        if not self._d.eof:
            raise DecodeError("malformed gzip body: truncated stream")
        return b"".join(self._parts)


def decode_content(chunks: Iterable[bytes], encoding: str, limit: int) -> bytes:
    """Join ``chunks`` applying ``Content-Encoding`` (identity or gzip) and the size limit."""
    enc = (encoding or "identity").strip().lower()
    if enc == "gzip":
        dec = GzipDecoder(limit)
        raw = 0
        for c in chunks:
            raw += len(c)
            if raw > limit:
                raise _too_large(limit, "before decompression")
            dec.feed(c)
        return dec.finish()
    if enc != "identity":
        raise UnsupportedMediaTypeError(
            f"unsupported content encoding {encoding!r}", hint="Send gzip or no encoding."
        )
    parts: list[bytes] = []
    size = 0
    for c in chunks:
        size += len(c)
        if size > limit:
            raise _too_large(limit, "before decompression")
        parts.append(c)
    return b"".join(parts)
