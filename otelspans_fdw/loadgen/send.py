"""Sending load generator traffic to a receiver, for ``otelspans generate``.

Two ways to send:

* ``sdk``: every process instance is an OpenTelemetry SDK ``TracerProvider`` (its own resource)
  with a ``BatchSpanProcessor`` and the real OTLP HTTP or gRPC exporter; the trace model is
  replayed through the tracer API with explicit ids and times.
* ``raw``: spans are encoded straight into OTLP requests of ``batch`` spans, one process per
  request like an SDK batch, all pre-encoded before sending, then posted by ``concurrency``
  clients (aiohttp or grpc.aio): the fast path for volume and benchmarks.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from otelspans_fdw.loadgen.traffic import SpanSpec, TraceModel, encode_requests

__all__ = ["Progress", "run", "send_raw", "send_sdk"]


class Progress:
    """Progress on stderr: one line redrawn in place on a terminal; elsewhere (a log file, a
    pipe, CI) a whole line every few seconds, so the output stays readable and ends with a
    newline."""

    #: seconds between lines off a terminal
    LOG_INTERVAL = 5.0

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.last = 0.0

    def update(self, spans: int, failed: int, force: bool = False) -> None:
        now = time.monotonic()
        interval = 0.25 if self.tty else self.LOG_INTERVAL
        if not self.enabled or (not force and now - self.last < interval):
            return
        self.last = now
        rate = spans / max(now - self.t0, 1e-9)
        pct = 100.0 * spans / max(self.total, 1)
        line = (
            f"sent {spans:>10,} / {self.total:,} spans ({pct:5.1f}%)  "
            f"{rate:>10,.0f} spans/s  failed requests {failed}"
        )
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if force else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _http_url(endpoint: str | None) -> str:
    ep = endpoint or "http://127.0.0.1:4318"
    if "://" not in ep:
        ep = "http://" + ep
    return ep if ep.rstrip("/").endswith("/v1/traces") else ep.rstrip("/") + "/v1/traces"


def _grpc_target(endpoint: str | None) -> str:
    ep = endpoint or "127.0.0.1:4317"
    return ep.split("://", 1)[-1].rstrip("/")


async def send_raw(
    requests: list[bytes],
    spans_per_request: list[int],
    *,
    protocol: str,
    endpoint: str | None,
    concurrency: int,
    token: str | None,
    progress: Progress,
) -> tuple[int, int]:
    """Send pre-encoded requests from ``concurrency`` clients; (spans sent, failed requests)."""
    queue = list(zip(requests, spans_per_request, strict=True))
    queue.reverse()
    sent = 0
    failed = 0
    headers = {"Content-Type": "application/x-protobuf"}
    if token:
        headers["Authorization"] = f"Bearer {token}"

    async def with_retries(send: Any, body: bytes) -> bool:
        for attempt in range(8):
            if await send(body):
                return True
            await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
        return False

    async def drain(send: Any) -> None:
        """Run ``concurrency`` clients that take requests from the queue until it is empty."""

        async def worker() -> None:
            nonlocal sent, failed
            while queue:
                body, n = queue.pop()
                if await with_retries(send, body):
                    sent += n
                else:
                    failed += 1
                progress.update(sent, failed)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    if protocol == "http":
        import aiohttp

        url = _http_url(endpoint)
        conn = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=conn) as session:

            async def send(body: bytes) -> bool:
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    return r.status == 200

            await drain(send)
    else:
        import grpc

        from otelspans_fdw.ingest.grpc_service import SERVICE_NAME

        md = (("authorization", f"Bearer {token}"),) if token else None
        async with grpc.aio.insecure_channel(
            _grpc_target(endpoint), options=[("grpc.max_send_message_length", 64 << 20)]
        ) as ch:
            call = ch.unary_unary(f"/{SERVICE_NAME}/Export")

            async def send(body: bytes) -> bool:
                try:
                    await call(body, metadata=md, timeout=60)
                    return True
                except grpc.aio.AioRpcError as e:
                    if e.code() in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                    ):
                        return False
                    raise

            await drain(send)
    progress.update(sent, failed, force=True)
    return sent, failed


def send_sdk(
    model: TraceModel,
    n_spans: int,
    *,
    protocol: str,
    endpoint: str | None,
    token: str | None,
    progress: Progress,
) -> tuple[int, int]:
    """Replay the model through one SDK TracerProvider per process and its OTLP exporter."""
    from opentelemetry import trace as trace_api
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult
    from opentelemetry.sdk.trace.id_generator import IdGenerator
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

    class FixedIds(IdGenerator):
        """Hands out the model's ids so that SDK spans equal the model exactly."""

        trace_id = 0
        span_id = 0

        def generate_trace_id(self) -> int:
            return self.trace_id

        def generate_span_id(self) -> int:
            return self.span_id

    headers = {"authorization": f"Bearer {token}"} if token else None
    counts = {"ok": 0, "failed": 0}

    def exporter() -> Any:
        if protocol == "http":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            inner = OTLPSpanExporter(endpoint=_http_url(endpoint), headers=headers)
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            inner = OTLPSpanExporter(
                endpoint=_grpc_target(endpoint), insecure=True, headers=headers
            )
        real_export = inner.export

        def export(spans: Any) -> SpanExportResult:
            r = real_export(spans)
            counts["ok" if r == SpanExportResult.SUCCESS else "failed"] += len(spans)
            progress.update(counts["ok"], counts["failed"])
            return r

        inner.export = export  # count what the real exporter reports
        return inner

    ids = FixedIds()
    providers = []
    for p in model.processes:
        tp = TracerProvider(resource=Resource(p.attributes), id_generator=ids)
        tp.add_span_processor(BatchSpanProcessor(exporter(), max_export_batch_size=512))
        providers.append(tp)
    tracers = [tp.get_tracer("otelspans.demo", "1") for tp in providers]
    live: dict[int, Any] = {}
    pending: list[tuple[Any, SpanSpec]] = []
    for s in model.spans(n_spans):
        if s.parent_id:
            parent = live.get(s.parent_id)
            ctx_span = (
                parent[0]
                if parent is not None and parent[1] == s.process
                else (
                    trace_api.NonRecordingSpan(
                        SpanContext(s.trace_id, s.parent_id, True, TraceFlags(TraceFlags.SAMPLED))
                    )
                )
            )
            ctx = trace_api.set_span_in_context(ctx_span)
        else:
            ctx = None
        ids.trace_id, ids.span_id = s.trace_id, s.span_id
        links = [
            Link(SpanContext(lt, ls, True, TraceFlags(TraceFlags.SAMPLED)), a)
            for lt, ls, a in s.links
        ]
        span = tracers[s.process].start_span(
            s.name,
            context=ctx,
            kind=SpanKind[s.kind],
            attributes=s.attributes,
            links=links,
            start_time=s.start,
        )
        for name, t, attrs in s.events:
            span.add_event(name, attrs, timestamp=t)
        if s.error:
            span.set_status(Status(StatusCode.ERROR, s.error))
        live[s.span_id] = (span, s.process)
        pending.append((span, s))
        if len(pending) > 64:  # end spans in creation order, a little behind
            sp, spec = pending.pop(0)
            sp.end(end_time=spec.end)
            live.pop(spec.span_id, None)
    for sp, spec in pending:
        sp.end(end_time=spec.end)
    for tp in providers:
        tp.shutdown()
    progress.update(counts["ok"], counts["failed"], force=True)
    return counts["ok"], counts["failed"]


def run(
    *,
    endpoint: str | None = None,
    protocol: str = "http",
    spans: int = 10_000,
    seed: int = 1,
    processes: int = 6,
    mode: str = "sdk",
    concurrency: int = 4,
    batch: int = 1000,
    token: str | None = None,
    progress: bool = True,
    base_time_ns: int | None = None,
) -> dict[str, Any]:
    """Generate and send about ``spans`` spans; returns counts and timing."""
    base = base_time_ns if base_time_ns is not None else time.time_ns() - 600 * 10**9
    model = TraceModel(seed, processes, base)
    t0 = time.monotonic()
    if mode == "raw":
        reqs = encode_requests(model, spans, batch)
        counts = [
            sum(len(ss.spans) for rs in r.resource_spans for ss in rs.scope_spans)
            for r in (ExportTraceServiceRequest.FromString(b) for b in reqs)
        ]
        t1 = time.monotonic()
        prog = Progress(sum(counts), progress)
        sent, failed = asyncio.run(
            send_raw(
                reqs,
                counts,
                protocol=protocol,
                endpoint=endpoint,
                concurrency=concurrency,
                token=token,
                progress=prog,
            )
        )
    else:
        t1 = t0
        prog = Progress(spans, progress)
        sent, failed = send_sdk(
            model, spans, protocol=protocol, endpoint=endpoint, token=token, progress=prog
        )
    t2 = time.monotonic()
    return {
        "spans": sent,
        "failed": failed,
        "encode_seconds": round(t1 - t0, 3),
        "send_seconds": round(t2 - t1, 3),
        "spans_per_second": round(sent / max(t2 - t1, 1e-9)),
    }
