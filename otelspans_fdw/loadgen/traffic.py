"""Load generator traffic: realistic multi-service traces, and their OTLP encoding.

A small shop: ``frontend`` calls ``checkout``, which calls ``cart``, ``inventory``, ``payments``
and ``shipping``; every service talks to its database.  Each trace crosses services with proper
parent links (a CLIENT span in the caller, a SERVER span in the callee), carries HTTP/DB
attributes, events (cache misses, retries, exceptions), links (payments link to the cart trace
that reserved the items) and errors (about 4% of payments fail and propagate up).

Everything derives from ``random.Random(seed)`` and ``base_time_ns``: the same seed and base time
give byte-identical requests, hence (ingestion being idempotent) no new blocks when re-sent.
:mod:`otelspans_fdw.loadgen.send` sends it to a receiver; the benchmarks encode it directly.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PbStatus

__all__ = ["Process", "SpanSpec", "TraceModel", "encode_requests", "fill_span", "kvs"]

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


def kvs(d: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=_any(v)) for k, v in d.items()]


def fill_span(pb: PbSpan, s: SpanSpec) -> None:
    pb.trace_id = s.trace_id.to_bytes(16, "big")
    pb.span_id = s.span_id.to_bytes(8, "big")
    if s.parent_id:
        pb.parent_span_id = s.parent_id.to_bytes(8, "big")
    pb.name = s.name
    pb.kind = KINDS[s.kind]  # type: ignore[assignment]
    pb.start_time_unix_nano = s.start
    pb.end_time_unix_nano = s.end
    pb.attributes.extend(kvs(s.attributes))
    for name, t, attrs in s.events:
        pb.events.add(name=name, time_unix_nano=t, attributes=kvs(attrs))
    for lt, ls, attrs in s.links:
        pb.links.add(
            trace_id=lt.to_bytes(16, "big"), span_id=ls.to_bytes(8, "big"), attributes=kvs(attrs)
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
        rs.resource.attributes.extend(kvs(model.processes[pi].attributes))
        ss = rs.scope_spans.add()
        ss.scope.name = "otelspans.demo"
        ss.scope.version = "1"
        for s in specs:
            fill_span(ss.spans.add(), s)
        out.append(req.SerializeToString())

    for s in model.spans(n_spans):
        buf = buffers.setdefault(s.process, [])
        buf.append(s)
        if len(buf) >= batch:
            flush(s.process)
    for pi in list(buffers):
        flush(pi)
    return out
