"""OTLP/HTTP transport: ``POST /v1/traces`` on aiohttp (protobuf or JSON, gzip accepted).

Deadlines: a connection has ``header_timeout`` seconds to send a request's headers (aiohttp's
keep-alive timer, which also closes a connection idle between requests or stuck in its
headers) and ``body_timeout`` seconds for the body (408, connection closed).

Errors follow the OTLP/HTTP specification: the body is a ``google.rpc.Status`` in the request's
encoding (plain text when the content type itself is refused); 429 and 503 carry
``Retry-After`` so exporters back off and retry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web
from google.protobuf import json_format
from google.rpc import status_pb2
from prometheus_client import CONTENT_TYPE_LATEST

from otelspans_fdw.exceptions import (
    AuthenticationError,
    DecodeError,
    MetadataError,
    OtelSpansError,
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
    StoreError,
    UnsupportedMediaTypeError,
)
from otelspans_fdw.ingest.auth import check_bearer
from otelspans_fdw.ingest.body import decode_content, is_json_content_type
from otelspans_fdw.ingest.decode import decode_request
from otelspans_fdw.ingest.pipeline import Ingestor

__all__ = ["METRICS_PATH", "TRACES_PATH", "make_app", "make_metrics_app"]

log = logging.getLogger(__name__)

TRACES_PATH = "/v1/traces"
METRICS_PATH = "/metrics"
CHUNK = 256 * 1024

# (HTTP status, google.rpc.Code) per error class, most specific first.
_STATUS: list[tuple[type[OtelSpansError], int, int]] = [
    (PayloadTooLargeError, 413, 8),  # RESOURCE_EXHAUSTED
    (UnsupportedMediaTypeError, 415, 3),  # INVALID_ARGUMENT
    (DecodeError, 400, 3),
    (RequestTimeoutError, 408, 4),  # DEADLINE_EXCEEDED
    (AuthenticationError, 401, 16),  # UNAUTHENTICATED
    (OverloadedError, 429, 14),  # UNAVAILABLE
    (MetadataError, 503, 14),
    (StoreError, 503, 14),
]


def _error_response(err: OtelSpansError, as_json: bool | None, retry_after: int) -> web.Response:
    status, code = next(((s, c) for cls, s, c in _STATUS if isinstance(err, cls)), (500, 13))
    headers: dict[str, str] = {}
    if status in (429, 503):
        headers["Retry-After"] = str(retry_after)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    message = str(err) + (f" ({err.hint})" if err.hint else "")
    if as_json is None:
        return web.Response(status=status, text=message, headers=headers)
    st = status_pb2.Status(code=code, message=message)
    if as_json:
        return web.Response(
            status=status,
            text=json_format.MessageToJson(st, indent=None),
            content_type="application/json",
            headers=headers,
        )
    return web.Response(
        status=status,
        body=st.SerializeToString(),
        content_type="application/x-protobuf",
        headers=headers,
    )


async def _read_body(
    request: web.Request, limit: int, take: Callable[[int], None], timeout: float
) -> list[bytes]:
    """The body's chunks, each counted by ``take`` as it arrives, within ``timeout`` seconds."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.content.iter_chunked(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLargeError(f"request body is over the limit of {limit} bytes")
                take(len(chunk))
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeoutError(
            f"request body not received within {timeout:g} s ({size} bytes arrived)",
            hint="Send the body faster, or raise the receiver's --body-timeout.",
        ) from None
    return chunks


def make_app(ingestor: Ingestor, *, token: str | None = None) -> web.Application:
    """The aiohttp application serving ``POST /v1/traces`` into ``ingestor``."""
    limits = ingestor.limits

    async def traces(request: web.Request) -> web.Response:
        as_json: bool | None = None
        try:
            with ingestor.metrics.observe("http") as record:
                check_bearer(token, request.headers.get("Authorization"))
                as_json = is_json_content_type(request.headers.get("Content-Type", ""))
                declared = request.content_length or 0
                if declared > limits.max_body:
                    raise PayloadTooLargeError(
                        f"request body of {declared} bytes is over the limit of {limits.max_body}"
                    )
                # Bytes are admitted as they arrive, the request slot once they all did:
                # slow senders hold what they sent, not a slot (see the pipeline module).
                with ingestor.admission.receiving() as take:
                    chunks = await _read_body(request, limits.max_body, take, limits.body_timeout)
                    with ingestor.admission.admit():
                        body = decode_content(
                            chunks, request.headers.get("Content-Encoding", ""), limits.max_body
                        )
                        del chunks
                        record.decoded = decode_request(body, json_encoded=as_json)
                        del body
                        resp = await ingestor.store_decoded(record.decoded)
        except OtelSpansError as e:
            err = _error_response(e, as_json, limits.retry_after_seconds)
            if isinstance(e, PayloadTooLargeError | OverloadedError | RequestTimeoutError):
                err.force_close()  # do not drain a huge or refused body: drop the connection
            return err
        if as_json:
            return web.Response(
                text=json_format.MessageToJson(resp, indent=None), content_type="application/json"
            )
        return web.Response(body=resp.SerializeToString(), content_type="application/x-protobuf")

    app = web.Application(client_max_size=limits.max_body)
    app.router.add_post(TRACES_PATH, traces)
    _add_metrics_route(app, ingestor)
    return app


def _add_metrics_route(app: web.Application, ingestor: Ingestor) -> None:
    """``GET /metrics``: unauthenticated like most exporters (it holds counts, not spans)."""

    async def metrics(_request: web.Request) -> web.Response:
        resp = web.Response(body=ingestor.metrics.exposition())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    app.router.add_get(METRICS_PATH, metrics)


def make_metrics_app(ingestor: Ingestor) -> web.Application:
    """An application serving only ``GET /metrics`` (for ``--metrics-port``)."""
    app = web.Application()
    _add_metrics_route(app, ingestor)
    return app
