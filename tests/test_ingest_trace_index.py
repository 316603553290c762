"""The trace index (issue 6): traces across 6 processes via the SDK exporters, late spans.

Expected answers are computed from what the SDK produced (its own spans and its own OTLP
encoder), never from our decoder: each export call is one request whose single ResourceSpans
payload we find among the stored blocks by its bytes.
"""

from __future__ import annotations

import asyncio
import random
import struct
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from ingest_helpers import make_request
from opentelemetry import trace as otel_trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_ingest_receiver import PB, post

from otelspans_fdw import db
from otelspans_fdw.ingest.decode import decode_request
from otelspans_fdw.ingest.groupcommit import GroupCommitter
from otelspans_fdw.lake.trace_index import blocks_for_traces, parse_trace_ids

SERVICES = ["frontend", "checkout", "cart", "inventory", "payments", "shipping"]
T0 = 1_760_000_000_000_000_000


class Shop:
    """Six SDK processes; each trace starts in frontend and hops through some of the others."""

    def __init__(self) -> None:
        self.mem: dict[str, InMemorySpanExporter] = {}
        self.tracers = {}
        for i, svc in enumerate(SERVICES):
            self.mem[svc] = InMemorySpanExporter()
            tp = TracerProvider(
                resource=Resource.create(
                    {"service.name": svc, "service.instance.id": f"{svc}-{i}", "process.pid": i}
                )
            )
            tp.add_span_processor(SimpleSpanProcessor(self.mem[svc]))
            self.tracers[svc] = tp.get_tracer("tests.trace_index")
        self.rng = random.Random(7)
        self.clock = T0

    def span(
        self, svc: str, name: str, parent: otel_trace.Span | None = None, dur: int = 1000
    ) -> otel_trace.Span:
        """A finished span in ``svc`` (explicit times: deterministic bounds)."""
        self.clock += 10_000
        ctx = otel_trace.set_span_in_context(parent) if parent is not None else None
        s = self.tracers[svc].start_span(name, context=ctx, start_time=self.clock)
        s.end(end_time=self.clock + dur)
        return s

    def trace(self, hops: list[str]) -> int:
        root = self.span("frontend", "GET /checkout", dur=10**6)
        parent = root
        for svc in hops:
            parent = self.span(svc, f"call {svc}", parent)
            self.span(svc, f"db {svc}", parent)
        return root.get_span_context().trace_id

    def finished(self, svc: str) -> list[ReadableSpan]:
        spans = list(self.mem[svc].get_finished_spans())
        self.mem[svc].clear()
        return spans


def payload_of(chunk: list[ReadableSpan]) -> bytes:
    """The SDK encoder's ResourceSpans for one export call (one process: one resource)."""
    (rs,) = encode_spans(chunk).resource_spans
    return rs.SerializeToString()


def stored_blocks(dsn: str, store: Path) -> dict[bytes, tuple[uuid.UUID, uuid.UUID, datetime]]:
    """Stored payload bytes -> (process_id, block_id, insert_time)."""
    with psycopg.connect(dsn) as c:
        rows = c.execute(
            "SELECT process_id, block_id, insert_time, object_path FROM otel_blocks"
        ).fetchall()
    return {(store / p).read_bytes(): (pid, bid, it) for pid, bid, it, p in rows}


def us(ns: int) -> datetime:
    return datetime.fromtimestamp(ns // 10**9, UTC).replace(microsecond=ns % 10**9 // 1000)


def test_trace_lookup_finds_exactly_the_blocks_across_processes(receiver) -> None:
    shop = Shop()
    traces = [shop.trace(SERVICES[1:])]  # all six processes
    traces += [shop.trace(shop.rng.sample(SERVICES[1:], shop.rng.randint(4, 5))) for _ in range(5)]
    traces += [shop.trace(shop.rng.sample(SERVICES[1:], 2)) for _ in range(6)]
    # Every process exports its spans in two requests (so traces also straddle requests);
    # even processes over HTTP, odd over gRPC.
    chunks: list[list[ReadableSpan]] = []
    for i, svc in enumerate(SERVICES):
        spans = shop.finished(svc)
        exp = (
            HttpExporter(endpoint=receiver.http_url)
            if i % 2 == 0
            else GrpcExporter(endpoint=receiver.grpc_target, insecure=True)
        )
        for part in (spans[: len(spans) // 2], spans[len(spans) // 2 :]):
            assert exp.export(part) == SpanExportResult.SUCCESS
            chunks.append(part)
    # Late spans of the first trace, in a later request from two processes.
    first_span = next(s for s in chunks[0] if s.context.trace_id == traces[0])
    late_parent = otel_trace.NonRecordingSpan(first_span.context)
    for svc in ("payments", "frontend"):
        shop.span(svc, "late retry", late_parent)
        part = shop.finished(svc)
        assert HttpExporter(endpoint=receiver.http_url).export(part) == SpanExportResult.SUCCESS
        chunks.append(part)
    # A retry of a whole request must not duplicate index rows.
    assert HttpExporter(endpoint=receiver.http_url).export(chunks[0]) == SpanExportResult.SUCCESS

    blocks = stored_blocks(receiver.dsn, receiver.store)
    with psycopg.connect(receiver.dsn) as c:
        proc_of_service = dict(
            c.execute(
                "SELECT properties->>'otel.resource.service.name', process_id FROM otel_processes"
            ).fetchall()
        )
        n_index_rows, n_index_ids, n_misaligned = c.execute(
            "SELECT count(*), sum(cardinality(trace_ids)),"
            " count(*) FILTER (WHERE length(bounds) <> 16 * cardinality(trace_ids))"
            " FROM otel_trace_blocks"
        ).fetchone()
    assert len(blocks) == len(chunks) == 14
    expected_rows = 0
    with psycopg.connect(receiver.dsn) as c:
        for tid in traces:
            want = {}
            for chunk in chunks:
                mine = [s for s in chunk if s.context.trace_id == tid]
                if not mine:
                    continue
                pid, bid, it = blocks[payload_of(chunk)]
                assert pid == proc_of_service[mine[0].resource.attributes["service.name"]]
                want[bid] = (pid, bid, it, us(min(s.start_time for s in mine)),
                             us(max(s.end_time for s in mine)))  # fmt: skip
            expected_rows += len(want)
            got = blocks_for_traces(c, [f"{tid:032x}"])
            assert {r.block_id: tuple(r) for r in got} == want
            assert len(got) == len(want)
        # Trace 0 crosses all six processes and arrives in 3 requests from frontend/payments.
        first = blocks_for_traces(c, [f"{traces[0]:032x}".upper()])
        assert len({r.process_id for r in first}) == 6
        by_proc = {}
        for r in first:
            by_proc.setdefault(r.process_id, []).append(r)
        assert len(by_proc[proc_of_service["payments"]]) >= 2  # the late block too
        # Several ids at once: the union, one row per block; junk ids match nothing.
        a, b = f"{traces[1]:032x}", f"{traces[7]:032x}"
        both = blocks_for_traces(c, [a, str(uuid.UUID(b)), "xyz", "00" * 15])
        assert {r.block_id for r in both} == {
            r.block_id for r in blocks_for_traces(c, [a]) + blocks_for_traces(c, [b])
        }
        assert blocks_for_traces(c, [f"{traces[0] ^ 1:032x}", "nothex" * 6]) == []
    distinct_pairs = {
        (s.context.trace_id, blocks[payload_of(ch)][1]) for ch in chunks for s in ch
    }  # every trace id, not only those asked above: the index has each pair exactly once
    assert n_index_ids == len(distinct_pairs) >= expected_rows
    assert n_index_rows == len(blocks)  # one row per block, the retried one not twice
    assert n_misaligned == 0


def test_invalid_spans_are_not_indexed_and_the_switch_turns_it_off(receiver_factory) -> None:
    req = make_request(3, seed=1)
    spans = req.resource_spans[0].scope_spans[0].spans
    spans[1].trace_id = uuid.UUID(int=99).bytes
    spans[2].trace_id = b"\x05" * 15  # invalid: rejected, never queryable, not indexed
    on = receiver_factory()
    assert post(on.http_url, req.SerializeToString(), PB)[0] == 200
    with psycopg.connect(on.dsn) as c:
        got = blocks_for_traces(c, [f"{1000 + 1:032x}", f"{99:032x}"])
        ids, bounds = c.execute("SELECT trace_ids, bounds FROM otel_trace_blocks").fetchone()
    (block,) = decode_request(req.SerializeToString()).blocks
    assert [r.block_id for r in got] == [block.block_id]
    # One row for the block: the two valid ids, each with its own bounds (in nanoseconds).
    assert ids == [uuid.UUID(int=1001), uuid.UUID(int=99)]
    s0, s1 = spans[0], spans[1]
    assert bounds == struct.pack(
        ">4Q",
        s0.start_time_unix_nano,
        s0.end_time_unix_nano,
        s1.start_time_unix_nano,
        s1.end_time_unix_nano,
    )
    # Both ids asked at once: the block once, with the union of the two traces' bounds.
    assert (got[0].begin_time, got[0].end_time) == (
        us(s0.start_time_unix_nano),
        us(s1.end_time_unix_nano),
    )
    on.stop()
    off = receiver_factory("--no-trace-index")
    req2 = make_request(2, seed=2)
    assert post(off.http_url, req2.SerializeToString(), PB)[0] == 200
    with psycopg.connect(off.dsn) as c:
        assert c.execute("SELECT count(*) FROM otel_blocks").fetchone()[0] == 2
        assert c.execute("SELECT count(*) FROM otel_trace_blocks").fetchone()[0] == 1  # unchanged
        assert blocks_for_traces(c, [f"{2000 + 1:032x}"]) == []


def test_decode_extracts_distinct_trace_ids_with_bounds() -> None:
    req = make_request(4, seed=3, extra_resources=1)
    spans = req.resource_spans[0].scope_spans[0].spans
    spans[3].trace_id = uuid.UUID(int=5).bytes
    blocks = decode_request(req.SerializeToString()).blocks
    t = uuid.UUID(int=3001).bytes
    s = list(spans)
    assert blocks[0].traces == {
        t: [s[0].start_time_unix_nano, s[2].end_time_unix_nano],
        uuid.UUID(int=5).bytes: [s[3].start_time_unix_nano, s[3].end_time_unix_nano],
    }
    assert list(blocks[1].traces) == [uuid.UUID(int=3101).bytes]
    assert parse_trace_ids(["0" * 31 + "1", "0" * 31 + "1", "bad"]) == [uuid.UUID(int=1)]


def test_pending_list_is_merged_aside_and_lookups_see_both_sides(fresh_dsn) -> None:
    """The receiver's merges empty the GIN pending list; ids still pending are found too."""
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        db.migrate(c)
        c.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
    # One block per request, one trace per block (trace id seed * 1000 + 1).
    blocks = [
        decode_request(make_request(4, seed=s).SerializeToString()).blocks for s in range(1, 6)
    ]

    async def commit_all(todo: list[list], every: int) -> int:
        gc = GroupCommitter(fresh_dsn, clean_every_ids=every)
        await gc.start()
        for bl in todo:
            await gc.commit(bl)
        await gc.close()  # waits for a merge in progress
        return gc.index_merges

    def pending() -> int:
        with psycopg.connect(fresh_dsn) as c:
            return c.execute(
                "SELECT n_pending_tuples"
                " FROM gin_metapage_info(get_raw_page('otel_trace_blocks_trace', 0))"
            ).fetchone()[0]

    assert asyncio.run(commit_all(blocks[:3], every=3)) == 1  # merged after the 3rd id
    assert pending() == 0
    assert asyncio.run(commit_all(blocks[3:], every=0)) == 0  # merges off: the ids stay pending
    assert pending() == 2
    with psycopg.connect(fresh_dsn) as c:
        for s, bl in enumerate(blocks, start=1):
            got = blocks_for_traces(c, [f"{s * 1000 + 1:032x}"])
            assert [r.block_id for r in got] == [bl[0].block_id]
