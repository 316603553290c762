"""Demo traffic for ``otelspans generate``: realistic multi-service traces over real OTLP.

A small shop: ``frontend`` calls ``checkout``, which calls ``cart``, ``inventory``, ``payments``
and ``shipping``; every service talks to its database.  Each trace crosses services with proper
parent links (a CLIENT span in the caller, a SERVER span in the callee), carries HTTP/DB
attributes, events (cache misses, retries, exceptions), links (payments link to the cart trace
that reserved the items) and errors (about 4% of payments fail and propagate up).

Everything derives from ``random.Random(seed)`` and ``base_time_ns``: the same seed and base time
give byte-identical requests, hence (ingestion being idempotent) no new blocks when re-sent.

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
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PbStatus

__all__ = ["Process", "SpanSpec", "TraceModel", "encode_requests", "run"]

SERVICES = ["frontend", "checkout", "cart", "inventory", "payments", "shipping"]
HOSTS = ["node-a", "node-b", "node-c"]
KINDS = {"INTERNAL": 1, "SERVER": 2, "CLIENT": 3, "PRODUCER": 4, "CONSUMER": 5}


@dataclass(frozen=True)
class Process:
    """One service instance: its OTLP resource."""

    index: int
    service: str
    attributes: dict[str, Any]


@dataclass
class SpanSpec:
    """One span of the model, independent of how it is sent."""

    process: int
    trace_id: int
    span_id: int
    parent_id: int
    name: str
    kind: str
    start: int
    end: int
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    links: list[tuple[int, int, dict[str, Any]]] = field(default_factory=list)
    error: str | None = None


def make_processes(n: int, rng: random.Random, base_time_ns: int) -> list[Process]:
    """``n`` process instances, every service at least once when ``n`` allows."""
    procs = []
    for i in range(max(1, n)):
        service = SERVICES[i % len(SERVICES)]
        host = HOSTS[i % len(HOSTS)]
        pid = 1000 + rng.randrange(60000)
        created = base_time_ns - rng.randrange(3600, 86400) * 10**9
        procs.append(
            Process(
                i,
                service,
                {
                    "service.name": service,
                    "service.namespace": "shop",
                    "service.version": f"1.{rng.randrange(10)}.{rng.randrange(10)}",
                    "service.instance.id": f"{service}-{i}-{rng.getrandbits(32):08x}",
                    "host.name": host,
                    "host.arch": "amd64",
                    "os.type": "linux",
                    "os.description": "Debian GNU/Linux 12 (bookworm)",
                    "process.pid": pid,
                    "process.owner": "app",
                    "process.creation.time": time.strftime(
                        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(created // 10**9)
                    ),
                    "process.runtime.name": "cpython",
                    "process.runtime.version": "3.11.2",
                    "deployment.environment": "demo",
                    "telemetry.sdk.name": "opentelemetry",
                    "telemetry.sdk.language": "python",
                },
            )
        )
    return procs


class TraceModel:
    """Generates traces of the shop (deterministic given the seed and base time)."""

    def __init__(self, seed: int, processes: int, base_time_ns: int):
        self.rng = random.Random(seed)
        self.base = base_time_ns
        self.processes = make_processes(processes, self.rng, base_time_ns)
        self.by_service: dict[str, list[Process]] = {}
        for p in self.processes:
            self.by_service.setdefault(p.service, []).append(p)
        self.clock = base_time_ns
        self.recent_cart_traces: list[tuple[int, int]] = []

    def _pick(self, service: str) -> Process:
        procs = self.by_service.get(service) or self.processes
        return procs[self.rng.randrange(len(procs))]

    def _span(
        self,
        out: list[SpanSpec],
        proc: Process,
        tid: int,
        parent: int,
        name: str,
        kind: str,
        start: int,
        dur: int,
        **attrs: Any,
    ) -> SpanSpec:
        s = SpanSpec(
            proc.index,
            tid,
            self.rng.getrandbits(64) | 1,
            parent,
            name,
            kind,
            start,
            start + dur,
            dict(attrs),
        )
        out.append(s)
        return s

    def _call(
        self,
        out: list[SpanSpec],
        caller: Process,
        tid: int,
        parent: int,
        service: str,
        route: str,
        start: int,
        depth: int,
    ) -> tuple[SpanSpec, bool]:
        """A CLIENT span in the caller and the SERVER span (plus children) in the callee."""
        rng = self.rng
        callee = self._pick(service)
        client = self._span(
            out,
            caller,
            tid,
            parent,
            f"POST {route}",
            "CLIENT",
            start,
            0,
            **{"http.request.method": "POST", "server.address": service, "url.path": route},
        )
        server = self._span(
            out,
            callee,
            tid,
            client.span_id,
            f"POST {route}",
            "SERVER",
            start + rng.randrange(100_000, 400_000),
            0,
            **{"http.request.method": "POST", "http.route": route},
        )
        t = server.start + rng.randrange(50_000, 200_000)
        failed = False
        for _ in range(rng.randrange(1, 3)):
            dur = rng.randrange(300_000, 4_000_000)
            db = self._span(
                out,
                callee,
                tid,
                server.span_id,
                f"SELECT {service}",
                "CLIENT",
                t,
                dur,
                **{
                    "db.system": "postgresql",
                    "db.namespace": service,
                    "db.query.text": f"SELECT * FROM {service} WHERE id = $1",
                },
            )
            if rng.random() < 0.1:
                db.events.append(("cache.miss", t + dur // 3, {"cache.key": f"{service}:{t}"}))
            t = db.end + rng.randrange(10_000, 100_000)
        if service == "cart":
            self.recent_cart_traces.append((tid, server.span_id))
            del self.recent_cart_traces[:-50]
        if service == "payments":
            if self.recent_cart_traces:
                lt, ls = self.recent_cart_traces[rng.randrange(len(self.recent_cart_traces))]
                server.links.append((lt, ls, {"link.reason": "reservation"}))
            if rng.random() < 0.04:
                failed = True
                server.error = "card declined"
                server.events.append(
                    (
                        "exception",
                        t,
                        {"exception.type": "CardDeclined", "exception.message": "card declined"},
                    )
                )
        if depth == 0 and service == "checkout":
            for sub in ("cart", "inventory", "payments", "shipping"):
                if sub == "shipping" and failed:
                    break
                child, err = self._call(out, callee, tid, server.span_id, sub, f"/{sub}", t, 1)
                t = child.end + rng.randrange(20_000, 200_000)
                failed = failed or err
        server.end = t + rng.randrange(20_000, 100_000)
        server.attributes["http.response.status_code"] = 500 if failed else 200
        if failed:
            server.error = server.error or "downstream error"
        client.end = server.end + rng.randrange(100_000, 400_000)
        client.attributes["http.response.status_code"] = 500 if failed else 200
        if failed:
            client.error = "HTTP 500"
        return client, failed

    def trace(self) -> list[SpanSpec]:
        """One user checkout: about 20-25 spans across 6 services."""
        rng = self.rng
        self.clock += rng.randrange(1_000_000, 20_000_000)
        tid = rng.getrandbits(128) | 1
        out: list[SpanSpec] = []
        front = self._pick("frontend")
        root = self._span(
            out,
            front,
            tid,
            0,
            "GET /checkout",
            "SERVER",
            self.clock,
            0,
            **{
                "http.request.method": "GET",
                "http.route": "/checkout",
                "user_agent.original": "Mozilla/5.0",
                "enduser.id": f"u{tid % 997}",
            },
        )
        render = self._span(
            out,
            front,
            tid,
            root.span_id,
            "render cart",
            "INTERNAL",
            root.start + 50_000,
            rng.randrange(100_000, 900_000),
        )
        child, failed = self._call(
            out, front, tid, root.span_id, "checkout", "/checkout", render.end + 10_000, 0
        )
        root.end = child.end + rng.randrange(50_000, 300_000)
        root.attributes["http.response.status_code"] = 500 if failed else 200
        if failed:
            root.error = "checkout failed"
        return out

    def spans(self, n: int) -> Iterator[SpanSpec]:
        """At least ``n`` spans, whole traces."""
        made = 0
        while made < n:
            t = self.trace()
            made += len(t)
            yield from t


# --- raw encoding ---------------------------------------------------------------------------


def _any(v: Any) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    return AnyValue(string_value=str(v))


def _kvs(d: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=_any(v)) for k, v in d.items()]


def _fill(pb: PbSpan, s: SpanSpec) -> None:
    pb.trace_id = s.trace_id.to_bytes(16, "big")
    pb.span_id = s.span_id.to_bytes(8, "big")
    if s.parent_id:
        pb.parent_span_id = s.parent_id.to_bytes(8, "big")
    pb.name = s.name
    pb.kind = KINDS[s.kind]  # type: ignore[assignment]
    pb.start_time_unix_nano = s.start
    pb.end_time_unix_nano = s.end
    pb.attributes.extend(_kvs(s.attributes))
    for name, t, attrs in s.events:
        pb.events.add(name=name, time_unix_nano=t, attributes=_kvs(attrs))
    for lt, ls, attrs in s.links:
        pb.links.add(
            trace_id=lt.to_bytes(16, "big"), span_id=ls.to_bytes(8, "big"), attributes=_kvs(attrs)
        )
    if s.error:
        pb.status.code = PbStatus.STATUS_CODE_ERROR
        pb.status.message = s.error


def encode_requests(model: TraceModel, n_spans: int, batch: int) -> list[bytes]:
    """Pre-encoded requests of ``batch`` spans each, one process per request (SDK-like)."""
    buffers: dict[int, list[SpanSpec]] = {}
    out: list[bytes] = []

    def flush(pi: int) -> None:
        specs = buffers.pop(pi, [])
        if not specs:
            return
        req = ExportTraceServiceRequest()
        rs = req.resource_spans.add()
        rs.resource.attributes.extend(_kvs(model.processes[pi].attributes))
        ss = rs.scope_spans.add()
        ss.scope.name = "otelspans.demo"
        ss.scope.version = "1"
        for s in specs:
            _fill(ss.spans.add(), s)
        out.append(req.SerializeToString())

    for s in model.spans(n_spans):
        buf = buffers.setdefault(s.process, [])
        buf.append(s)
        if len(buf) >= batch:
            flush(s.process)
    for pi in list(buffers):
        flush(pi)
    return out


# --- sending --------------------------------------------------------------------------------


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
