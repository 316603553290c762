"""One block (serialized OTLP ``ResourceSpans``) -> an Arrow table of span rows.  No I/O.

The row mapping is upstream's (see ``reference/upstream-otel-spans.md``), with the OTLP rules
of :mod:`otelspans_fdw.otlp` (the receiver's, so what it accepted is what becomes rows):

* spans that :func:`~otelspans_fdw.otlp.span_rejection` refuses are skipped (the receiver
  counted them as rejected already);
* ``parent_span_id`` is NULL unless it is 8 non-zero bytes; ``status_message`` NULL when empty;
* ``kind``/``status`` are names (unknown numbers -> ``UNSPECIFIED``/``UNSET``);
* ``properties`` = the span's attributes plus ``otel.scope.name``, ``otel.scope.version``,
  ``otel.scope.attr.<k>`` and ``otel.scope.schema_url`` when non-empty (on a key collision the
  span's own attribute wins: it is the more specific);
* ``events`` = ``[{name, time (ns), attributes}]``, ``links`` = ``[{trace_id, span_id,
  attributes}]`` with hex ids;
* ``AnyValue`` -> JSON and text as :func:`~otelspans_fdw.otlp.anyvalue_to_json` says (U+0000
  becomes U+FFFD in names, messages, keys and values: PostgreSQL cannot hold it).

Speed: this is the cold path of every query (target >= 200k spans/s), and Python work per span
is what limits it (each protobuf field access from Python costs about 60 ns, a dozen per span).
So the normal ("columnar") path does none, and works on many blocks at once
(:func:`decode_blocks`: each Arrow call costs ~10 us whatever its size, ~130 calls per pass):

1. the spans of all the blocks are parsed once, as columns (:data:`~._lazy_pb.SpanColumns`:
   spans concatenated, each behind a sentinel prefix that marks span boundaries in every
   column);
2. every column becomes an Arrow array; absent fields, span validity, kind/status names, hex
   ids (one ``hexlify`` over a whole column), timestamps are Arrow kernels;
3. ``properties``: the batch's distinct serialized attributes (Arrow ``dictionary_encode``)
   are looked up in a process-wide cache of JSON fragments ``"key":value``, taken back to
   every attribute and joined per span by Arrow (``binary_join`` over a list array); repeated
   keys are found with Arrow too.  Only events and links (a few percent of spans, mostly
   unique values) are rendered one by one in Python.

What the columnar path cannot prove it handles exactly (a span field explicitly set to its
default value, an empty serialized attribute) sends the batch block by block, then scope by
scope, to the per-span path (:func:`_scope_rows_slow`), which defines the behaviour; tests
compare both with an independent decoding.  Spans holding a key twice, or a key of a scope
extra, are rendered apart with dict semantics.
"""

from __future__ import annotations

import struct
import uuid
from binascii import hexlify
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf.message import DecodeError as ProtobufDecodeError
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from otelspans_fdw.exceptions import DecodeError
from otelspans_fdw.lake._lazy_pb import (
    SENTINEL_PREFIX,
    LazySpan,
    RawResourceSpans,
    SpanColumns,
)
from otelspans_fdw.lake.spanjson import (
    attr_items,
    event_json,
    json_object,
    link_json,
    scope_extras,
    to_json,
)
from otelspans_fdw.otlp import (
    KINDS,
    MAX_TIME_NS,
    STATUSES,
    ZERO_SPAN_ID,
    ZERO_TRACE_ID,
    parent_or_none,
    span_rejection,
)
from otelspans_fdw.schema import COLUMN_NAMES, TIMESTAMP, arrow_schema

__all__ = [
    "BlockInfo",
    "decode_block",
    "decode_blocks",
    "empty_table",
    "hex_array",
    "iter_decode_blocks",
]

_KIND_DICT = pa.array(KINDS, pa.utf8())
_STATUS_DICT = pa.array(STATUSES, pa.utf8())


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """What a block's rows take from the metadata rather than from the payload."""

    process_id: uuid.UUID
    stream_id: uuid.UUID
    block_id: uuid.UUID
    insert_time: datetime
    exe: str | None = None
    username: str | None = None
    computer: str | None = None
    process_properties: str = "{}"  # JSON text, keys sorted
    service_name: str | None = None  # service.name of the process (issue 6)


def hex_array(
    ids: bytes | memoryview, width: int, n: int, valid: list[bool] | None = None
) -> pa.Array:
    """``n`` ids of ``width`` bytes, concatenated in ``ids``, as lowercase hex strings.

    One ``hexlify`` call; the text is cut into ``2 * width`` characters by Arrow (a
    fixed-size binary view cast to strings): no Python work per id.  ``valid`` marks nulls
    (their bytes are ignored).
    """
    text = pa.Array.from_buffers(pa.binary(2 * width), n, [None, pa.py_buffer(hexlify(ids))])
    out = text.cast(pa.binary()).view(pa.utf8())
    if valid is not None and not all(valid):
        out = pc.if_else(pa.array(valid, pa.bool_()), out, pa.scalar(None, pa.utf8()))
    return out


def _fixed_width_bytes(arr: pa.Array, width: int) -> memoryview:
    """The values of a binary array whose values are all ``width`` bytes, as one buffer view.

    Binary values are stored back to back, so they are the slice of the data buffer starting
    at the first offset: no copy, no Python work per value.
    """
    n = len(arr)
    if n == 0:
        return memoryview(b"")
    offsets, data = arr.buffers()[1], arr.buffers()[2]
    (first,) = struct.unpack_from("<i", offsets, arr.offset * 4)
    return memoryview(data)[first : first + n * width]  # type: ignore[arg-type]


def _hex_ids(ids: pa.Array, width: int) -> pa.Array:
    """Binary ids -> lowercase hex; NULL where an id is null or not ``width`` bytes."""
    ok = pc.equal(pc.binary_length(ids), width).fill_null(False)
    all_ok = pc.all(ok).as_py()
    if not all_ok:
        ids = pc.if_else(ok, ids, pa.scalar(b"\0" * width, pa.binary()))
    out = hex_array(_fixed_width_bytes(ids, width), width, len(ids))
    return out if all_ok else pc.if_else(ok, out, pa.scalar(None, pa.utf8()))


def _ns_to_timestamp(ns: pa.Array) -> pa.Array:
    """Epoch nanoseconds (int64) -> ``timestamp('us', UTC)``, truncated (positive times)."""
    return pc.divide(ns, pa.scalar(1000, pa.int64())).cast(TIMESTAMP)


def empty_table() -> pa.Table:
    """A table with the span schema and no rows."""
    return arrow_schema().empty_table()


_STATUS_CACHE: dict[bytes, tuple[int, str | None]] = {}


def _status(raw: bytes) -> tuple[int, str | None]:
    got = _STATUS_CACHE.get(raw)
    if got is None:
        st = Status.FromString(raw)
        code = st.code if 0 <= st.code < len(STATUSES) else 0
        got = (code, st.message or None)
        if len(_STATUS_CACHE) > 10_000:
            _STATUS_CACHE.clear()
        _STATUS_CACHE[raw] = got
    return got


# --- the columnar path -----------------------------------------------------------------------


def _singular(col: Any, n: int, typ: pa.DataType) -> pa.Array | None:
    """The per-span values of a singular span field from its :data:`SpanColumns` column.

    The column holds, for each span, the sentinel (the default value: falsy) and then the
    span's own occurrences.  Null where a span has none; the last occurrence wins, as in
    protobuf.  None when the column does not hold exactly one sentinel per span, i.e. some
    span sets the field explicitly to its default (the caller then decodes span by span).
    """
    m = len(col)
    if m == n:  # no span has the field
        return None if any(col) else pa.nulls(n, typ)
    if m == 2 * n:  # every span has it once: the usual case for ids, times, name, kind
        values = col[1::2]
        if all(values) and not any(col[0::2]):
            return pa.array(values, typ)
    arr = pa.array(list(col), typ)
    is_sentinel = (
        pc.equal(arr, pa.scalar(0, typ))
        if pa.types.is_integer(typ)
        else pc.equal(pc.binary_length(arr), 0)
    )
    starts = pc.indices_nonzero(is_sentinel)
    if len(starts) != n or starts[0].as_py() != 0:
        return None
    last = pc.subtract(pa.concat_arrays([starts[1:], pa.array([m], pa.uint64())]), 1)
    return pc.if_else(is_sentinel.take(last), pa.scalar(None, typ), arr.take(last))


def _repeated(col: Any, n: int) -> tuple[pa.Array, pa.Array] | None:
    """(offsets, values) of a repeated span field: span ``i`` owns ``values[off[i]:off[i+1]]``.

    None when the column does not hold exactly one sentinel per span (see :func:`_singular`).
    """
    items = list(col)
    if len(items) == n:  # no span has any
        if any(items):
            return None
        return pa.repeat(pa.scalar(0, pa.int32()), n + 1), pa.array([], pa.binary())
    arr = pa.array(items, pa.binary())
    is_sentinel = pc.equal(pc.binary_length(arr), 0)
    starts = pc.indices_nonzero(is_sentinel)
    if len(starts) != n or starts[0].as_py() != 0:
        return None
    is_value = pc.invert(is_sentinel)
    before = pc.cumulative_sum(is_value.cast(pa.int32()))  # values up to each position
    offsets = pa.concat_arrays([before.take(starts), pa.array([len(items) - n], pa.int32())])
    return offsets, arr.filter(is_value)


@dataclass(slots=True)
class _Scope:
    """The spans of one ``ScopeSpans`` of one block, still serialized."""

    block: int  # index of the block in its batch
    spans: list[bytes]
    extras: dict[str, Any]  # the otel.scope.* properties (shared: never mutated)
    prefix: str  # their JSON object members, without braces


_SCOPE_CACHE: dict[tuple[bytes, str], tuple[dict[str, Any], str]] = {}


def _scope_info(ss: Any) -> tuple[dict[str, Any], str]:
    """(extras, prefix) of a scope; cached, since every block of a process repeats its scopes."""
    key = (ss.scope, ss.schema_url)
    got = _SCOPE_CACHE.get(key)
    if got is None:
        extras = scope_extras(ss)
        got = (extras, to_json(extras)[1:-1])
        if len(_SCOPE_CACHE) > 10_000:
            _SCOPE_CACHE.clear()
        _SCOPE_CACHE[key] = got
    return got


def _runs(values: Sequence[int], counts: Sequence[int]) -> pa.Array:
    """``values[i]`` repeated ``counts[i]`` times, as int32 (list repetition runs in C)."""
    out: list[int] = []
    for v, c in zip(values, counts, strict=True):
        out += [v] * c
    return pa.array(out, pa.int32())


_M1, _M2, _M4, _H01 = (
    0x5555555555555555,
    0x3333333333333333,
    0x0F0F0F0F0F0F0F0F,
    0x0101010101010101,
)


def _popcount(x: pa.Array) -> pa.Array:
    """Set bits of each uint64 (the SWAR popcount, in Arrow kernels)."""
    sub, add, band, shr = pc.subtract, pc.add, pc.bit_wise_and, pc.shift_right
    u = pa.uint64()
    x = sub(x, band(shr(x, pa.scalar(1, u)), pa.scalar(_M1, u)))
    x = add(band(x, pa.scalar(_M2, u)), band(shr(x, pa.scalar(2, u)), pa.scalar(_M2, u)))
    x = band(add(x, shr(x, pa.scalar(4, u))), pa.scalar(_M4, u))
    return shr(pc.multiply(x, pa.scalar(_H01, u)), pa.scalar(56, u))


def _rows_with_repeated_keys(
    offsets: pa.Array, keys: pa.Array, nkeys: int, nrows: int
) -> pa.Array | None:
    """Which rows hold a key twice (BooleanArray), or None when none does.

    With at most 63 distinct keys, row ``r`` sums ``2**key`` over its values (segmented sums
    from one wrapping cumulative sum): the keys are distinct exactly when the sum has as many
    set bits as the row has values (a repeat carries and loses a bit; a wrap loses more).
    Otherwise the (row, key) pairs are counted with a hash (slower, exact too).
    """
    nvalues = len(keys)
    if nvalues <= nrows:
        return None if nvalues < 2 else _repeated_keys_hashed(offsets, keys, nkeys, nrows)
    if nkeys > 63:
        return _repeated_keys_hashed(offsets, keys, nkeys, nrows)
    u = pa.uint64()
    bits = pa.array([1 << k for k in range(nkeys)], u).take(keys)
    sums = pa.concat_arrays([pa.array([0], u), pc.cumulative_sum(bits)])
    per_row = pc.subtract(sums.take(offsets[1:]), sums.take(offsets[:-1]))
    counts = pc.subtract(offsets[1:], offsets[:-1]).cast(u)
    bad = pc.not_equal(_popcount(per_row), counts)
    return bad if pc.any(bad).as_py() else None


def _repeated_keys_hashed(
    offsets: pa.Array, keys: pa.Array, nkeys: int, nrows: int
) -> pa.Array | None:
    rows = pa.ListArray.from_arrays(offsets, keys).value_parent_indices()
    pairs = pc.add(pc.multiply(rows, nkeys), keys.cast(pa.int64()))
    if pc.count_distinct(pairs).as_py() == len(keys):
        return None
    seen: set[tuple[int, int]] = set()
    bad = [False] * nrows
    for r, k in zip(rows.to_pylist(), keys.to_pylist(), strict=True):
        if (r, k) in seen:
            bad[r] = True
        seen.add((r, k))
    return pa.array(bad, pa.bool_())


def _json_objects(
    offsets: pa.Array,
    values: pa.Array,
    nrows: int,
    opening: pa.Array | pa.Scalar,
    bare: pa.Array | pa.Scalar,
    extras_of: Callable[[int], tuple[dict[str, Any], str]] | None = None,
    extra_keys: frozenset[str] = frozenset(),
) -> pa.Array:
    """JSON object text per row from serialized ``KeyValue`` values, joined by Arrow.

    Row ``r`` owns ``values[offsets[r]:offsets[r+1]]``; its text is ``opening`` + the cached
    fragments joined by commas + ``}``, or ``bare`` when it has none (``opening``/``bare``
    carry the scope extras of ``properties``).  The distinct encodings of the batch
    (``dictionary_encode``) are looked up in the fragment cache, once each.  Rows holding a
    key twice, or a key of their extras (``extras_of(r)`` -> extras, prefix), are rendered
    by :func:`json_object` instead (dict semantics).
    """
    if len(values) == 0:
        return pa.repeat(bare, nrows) if isinstance(bare, pa.Scalar) else bare
    enc = values.dictionary_encode()
    items = attr_items(enc.dictionary.to_pylist())
    frags = pa.array([f for _, f in items], pa.utf8()).take(enc.indices)
    lists = pa.ListArray.from_arrays(offsets, frags)
    text = pc.binary_join_element_wise(opening, pc.binary_join(lists, ","), "}", "")
    text = pc.if_else(pc.equal(pc.list_value_length(lists), 0), bare, text)
    key_ids: dict[str, int] = {}
    ids = [key_ids.setdefault(k, len(key_ids)) for k, _ in items]
    keys = pa.array(ids, pa.int32()).take(enc.indices)
    bad = _rows_with_repeated_keys(offsets, keys, len(key_ids), nrows)
    if extra_keys and not extra_keys.isdisjoint(key_ids):
        rows = lists.value_parent_indices().to_pylist()
        flags = [False] * nrows if bad is None else bad.to_pylist()
        assert extras_of is not None
        for r, (k, _) in zip(rows, [items[j] for j in enc.indices.to_pylist()], strict=True):
            if k in extras_of(r)[0]:
                flags[r] = True
        bad = pa.array(flags, pa.bool_())
    if bad is None:
        return text
    # Rare: render the rows concerned in Python.
    order = pc.indices_nonzero(bad).to_pylist()
    starts, indices = offsets.to_pylist(), enc.indices.to_pylist()
    texts = []
    for r in order:
        row_items = [items[j] for j in indices[starts[r] : starts[r + 1]]]
        extras, prefix = extras_of(r) if extras_of is not None else ({}, "")
        texts.append(json_object(row_items, extras, prefix))
    return pc.replace_with_mask(text, bad, pa.array(texts, pa.utf8()))


def _properties_column(
    offsets: pa.Array, values: pa.Array, scopes: Sequence[_Scope], n: int
) -> pa.Array:
    """The ``properties`` JSON text of the ``n`` spans of ``scopes``."""
    if len({s.prefix for s in scopes}) == 1:
        prefix = scopes[0].prefix
        opening: pa.Array | pa.Scalar = pa.scalar("{" + prefix + ("," if prefix else ""))
        bare: pa.Array | pa.Scalar = pa.scalar("{" + prefix + "}")
        scope_of = None
    else:
        scope_of = _runs(range(len(scopes)), [len(s.spans) for s in scopes])
        opening = pa.array(["{" + s.prefix + ("," if s.prefix else "") for s in scopes])
        opening = opening.take(scope_of)
        bare = pa.array(["{" + s.prefix + "}" for s in scopes]).take(scope_of)
    extra_keys = frozenset().union(*(s.extras for s in scopes))
    scope_list: list[int] = []

    def extras_of(row: int) -> tuple[dict[str, Any], str]:
        if scope_of is None:
            return scopes[0].extras, scopes[0].prefix
        if not scope_list:
            scope_list.extend(scope_of.to_pylist())
        s = scopes[scope_list[row]]
        return s.extras, s.prefix

    return _json_objects(offsets, values, n, opening, bare, extras_of, extra_keys)


def _nested_column(
    offsets: pa.Array, values: pa.Array, n: int, render: Callable[[bytes], str]
) -> pa.Array:
    """``events``/``links`` JSON arrays: each value rendered in Python, joined by Arrow.

    Events and links are few (a few percent of spans) and their attribute values are mostly
    unique (times, cache keys): a columnar parse measured no faster than this.
    """
    if len(values) == 0:
        return pa.repeat(pa.scalar("[]", pa.utf8()), n)
    texts = pa.array([render(raw) for raw in values.to_pylist()], pa.utf8())
    joined = pc.binary_join(pa.ListArray.from_arrays(offsets, texts), ",")
    return pc.binary_join_element_wise("[", joined, "]", "")


def _columns(scopes: Sequence[_Scope]) -> dict[str, pa.Array] | None:
    """The span columns of ``scopes`` in one pass, no Python work per span.

    None when the columnar parse cannot be trusted to match the per-span one (see
    :func:`_singular`), or something needs the per-span path to decide (an undecodable
    attribute may belong to a skipped span; a timestamp beyond int64 must be reported).
    """
    spans = [b for s in scopes for b in s.spans]
    n = len(spans)
    try:
        c = SpanColumns.FromString(SENTINEL_PREFIX + SENTINEL_PREFIX.join(spans))
    except ProtobufDecodeError:
        return None
    del spans
    binary, utf8 = pa.binary(), pa.utf8()
    trace_id = _singular(c.trace_id, n, binary)
    span_id = _singular(c.span_id, n, binary)
    start = _singular(c.start_time_unix_nano, n, pa.uint64())
    end = _singular(c.end_time_unix_nano, n, pa.uint64())
    parent = _singular(c.parent_span_id, n, binary)
    name = _singular(c.name, n, utf8)
    kind = _singular(c.kind, n, pa.int32())
    status = _singular(c.status, n, binary)
    attrs = _repeated(c.attributes, n)
    events = _repeated(c.events, n)
    links = _repeated(c.links, n)
    if (
        trace_id is None
        or span_id is None
        or start is None
        or end is None
        or parent is None
        or name is None
        or kind is None
        or status is None
        or attrs is None
        or events is None
        or links is None
    ):
        return None
    valid = _valid_spans(trace_id, span_id, start, end)
    parent = pc.if_else(
        pc.equal(parent, pa.scalar(ZERO_SPAN_ID, binary)), pa.scalar(None, binary), parent
    )
    kind = kind.fill_null(0)
    kind = pc.if_else(pc.and_(pc.greater_equal(kind, 0), pc.less(kind, len(KINDS))), kind, 0)
    if status.null_count == n:
        codes: pa.Array = pa.repeat(pa.scalar(0, pa.int8()), n)
        messages: pa.Array = pa.nulls(n, utf8)
    else:
        enc = status.dictionary_encode()
        parsed = [_status(raw) for raw in enc.dictionary.to_pylist()]
        codes = pa.array([c for c, _ in parsed], pa.int8()).take(enc.indices).fill_null(0)
        messages = pa.array([m for _, m in parsed], utf8).take(enc.indices)
    try:
        cols = {
            "block": _runs([s.block for s in scopes], [len(s.spans) for s in scopes]),
            "trace_id": trace_id,
            "span_id": span_id,
            "parent": parent,
            "start": _as_int64(start, valid),
            "end": _as_int64(end, valid),
            "name": name.fill_null(""),
            "kind": kind.cast(pa.int8()),
            "status": codes,
            "status_message": messages,
            "properties": _properties_column(*attrs, scopes, n),
            "events": _nested_column(*events, n, event_json),
            "links": _nested_column(*links, n, link_json),
        }
    except ProtobufDecodeError:
        return None
    if not pc.all(valid).as_py():
        cols = {k: v.filter(valid) for k, v in cols.items()}
    return cols


def _valid_spans(trace_id: pa.Array, span_id: pa.Array, start: pa.Array, end: pa.Array) -> pa.Array:
    """:func:`otelspans_fdw.otlp.span_rejection` as Arrow kernels: True where a span is valid."""
    u64 = pa.uint64()
    zero, limit = pa.scalar(0, u64), pa.scalar(MAX_TIME_NS, u64)
    ids = pc.and_(
        pc.and_(pc.equal(pc.binary_length(trace_id), 16), pc.equal(pc.binary_length(span_id), 8)),
        pc.and_(
            pc.not_equal(trace_id, pa.scalar(ZERO_TRACE_ID, pa.binary())),
            pc.not_equal(span_id, pa.scalar(ZERO_SPAN_ID, pa.binary())),
        ),
    )
    times = pc.and_(
        pc.and_(pc.not_equal(start, zero), pc.not_equal(end, zero)),
        pc.and_(pc.less(start, limit), pc.less(end, limit)),
    )
    return pc.and_(pc.and_(ids, times), pc.greater_equal(end, start)).fill_null(False)


def _as_int64(ns: pa.Array, valid: pa.Array) -> pa.Array:
    """Span times as int64; invalid spans (filtered out afterwards) as 0, which always fits."""
    return pc.if_else(valid, ns, pa.scalar(0, pa.uint64())).cast(pa.int64())


# --- the per-span path (reference behaviour, and fallback) -----------------------------------


def _scope_rows_slow(scope: _Scope) -> dict[str, pa.Array]:
    """The span columns of one scope, decoding span by span."""
    extras, prefix = scope.extras, scope.prefix
    trace_ids: list[bytes] = []
    span_ids: list[bytes] = []
    parents: list[bytes | None] = []
    starts: list[int] = []
    ends: list[int] = []
    names: list[str] = []
    kinds: list[int] = []
    statuses: list[int] = []
    messages: list[str | None] = []
    props: list[str] = []
    events: list[str] = []
    links: list[str] = []
    nkinds = len(KINDS)
    empty_props = "{" + prefix + "}"
    for raw in scope.spans:
        s = LazySpan.FromString(raw)
        tid = s.trace_id
        sid = s.span_id
        st = s.start_time_unix_nano
        en = s.end_time_unix_nano
        if span_rejection(tid, sid, st, en) is not None:
            continue
        trace_ids.append(tid)
        span_ids.append(sid)
        parents.append(parent_or_none(s.parent_span_id))
        starts.append(st)
        ends.append(en)
        names.append(s.name)
        k = s.kind
        kinds.append(k if 0 <= k < nkinds else 0)
        status = s.status
        if status:
            c, m = _status(status)
            statuses.append(c)
            messages.append(m)
        else:
            statuses.append(0)
            messages.append(None)
        attrs = s.attributes
        props.append(json_object(attr_items(attrs), extras, prefix) if attrs else empty_props)
        ev = s.events
        events.append("[" + ",".join([event_json(e) for e in ev]) + "]" if ev else "[]")
        lk = s.links
        links.append("[" + ",".join([link_json(x) for x in lk]) + "]" if lk else "[]")
    utf8 = pa.utf8()
    return {
        "block": pa.repeat(pa.scalar(scope.block, pa.int32()), len(starts)),
        "trace_id": pa.array(trace_ids, pa.binary()),
        "span_id": pa.array(span_ids, pa.binary()),
        "parent": pa.array(parents, pa.binary()),
        "start": pa.array(starts, pa.int64()),
        "end": pa.array(ends, pa.int64()),
        "name": pa.array(names, utf8),
        "kind": pa.array(kinds, pa.int8()),
        "status": pa.array(statuses, pa.int8()),
        "status_message": pa.array(messages, utf8),
        "properties": pa.array(props, utf8),
        "events": pa.array(events, utf8),
        "links": pa.array(links, utf8),
    }


# --- blocks ----------------------------------------------------------------------------------

#: Payload bytes decoded in one columnar pass: large enough to amortise the fixed cost of the
#: Arrow calls (about 10 us each, some 60 per pass: under 1% of an 8 MB pass), small enough
#: to bound a refresh's memory (rows are written batch by batch, see ``lake/refresh.py``).
BATCH_BYTES = 8 << 20


@dataclass(slots=True)
class DecodedBlocks:
    """The rows of several blocks, and the blocks that could not be decoded."""

    table: pa.Table
    errors: dict[int, DecodeError]  # index in the input -> why


def decode_blocks(
    blocks: Iterable[tuple[bytes, BlockInfo]], *, columnar: bool = True
) -> DecodedBlocks:
    """The span rows of ``blocks`` (payload, info) in one table, in input order.

    Blocks are decoded together, :data:`BATCH_BYTES` of payload at a time (``blocks`` may be
    a generator: payloads are released batch by batch).  A block that cannot be decoded is
    left out and reported in :attr:`DecodedBlocks.errors` under its position in ``blocks``;
    the others are unaffected.  ``columnar=False`` decodes span by span (the reference path;
    tests compare the two).
    """
    errors: dict[int, DecodeError] = {}
    tables: list[pa.Table] = []
    for got in iter_decode_blocks(blocks, columnar=columnar):
        tables.append(got.table)
        errors.update(got.errors)
    if not tables:
        return DecodedBlocks(empty_table(), errors)
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    return DecodedBlocks(table, errors)


def iter_decode_blocks(
    blocks: Iterable[tuple[bytes, BlockInfo]], *, columnar: bool = True
) -> Iterator[DecodedBlocks]:
    """:func:`decode_blocks` one batch (:data:`BATCH_BYTES` of payload) at a time, so that a
    caller writing rows as they come holds one batch of payloads and rows, not the
    partition's.  Errors are keyed by position in ``blocks``, as in :func:`decode_blocks`."""
    batch: list[tuple[int, bytes, BlockInfo]] = []
    size = 0
    for i, (payload, info) in enumerate(blocks):
        batch.append((i, payload, info))
        size += len(payload)
        if size >= BATCH_BYTES:
            errors: dict[int, DecodeError] = {}
            table = _decode_batch(batch, errors, columnar)
            batch, size = [], 0
            yield DecodedBlocks(table, errors)
    if batch:
        errors = {}
        yield DecodedBlocks(_decode_batch(batch, errors, columnar), errors)


def decode_block(payload: bytes, info: BlockInfo, *, columnar: bool = True) -> pa.Table:
    """The span rows of one block, in the column order of :func:`arrow_schema`.

    Raises:
        DecodeError: the payload is not a valid ``ResourceSpans`` message, or a span's
            timestamp does not fit a signed 64-bit integer.
    """
    got = decode_blocks([(payload, info)], columnar=columnar)
    if got.errors:
        raise got.errors[0]
    return got.table


def _error(info: BlockInfo, e: Exception) -> DecodeError:
    """Why a block is skipped.  Anything the per-span path raises lands here: a block that
    this code cannot turn into rows must not fail the query of every other block with it."""
    if isinstance(e, ProtobufDecodeError):
        return DecodeError(f"block {info.block_id}: malformed ResourceSpans: {e}")
    if isinstance(e, OverflowError | pa.ArrowInvalid):
        return DecodeError(f"block {info.block_id}: span value out of range: {e}")
    return DecodeError(f"block {info.block_id}: cannot be decoded: {type(e).__name__}: {e}")


_BLOCK_ERRORS = (ProtobufDecodeError, OverflowError, pa.ArrowInvalid)


def _decode_batch(
    batch: list[tuple[int, bytes, BlockInfo]], errors: dict[int, DecodeError], columnar: bool
) -> pa.Table:
    """One columnar pass over ``batch``; block by block (then span by span) if it fails."""
    per_block: list[list[_Scope]] = []
    infos: list[BlockInfo] = []
    origin: list[int] = []  # position in the input of each decodable block
    for i, payload, info in batch:
        b = len(infos)
        try:
            scopes = []
            for ss in RawResourceSpans.FromString(payload).scope_spans:
                spans = list(ss.spans)
                if spans:
                    scopes.append(_Scope(b, spans, *_scope_info(ss)))
        except ProtobufDecodeError as e:
            errors[i] = _error(info, e)
            continue
        per_block.append(scopes)
        infos.append(info)
        origin.append(i)
    chunks: list[dict[str, pa.Array]] = []
    cols = None
    scopes_all = [s for sc in per_block for s in sc]
    if columnar and scopes_all:
        try:
            cols = _columns(scopes_all)
        except _BLOCK_ERRORS:
            cols = None  # find the block concerned, below
    if cols is not None:
        chunks.append(cols)
    else:
        for b, scopes in enumerate(per_block):
            one = None
            if not scopes:
                continue
            if columnar and len(per_block) > 1:
                try:
                    one = _columns(scopes)
                except _BLOCK_ERRORS:
                    one = None  # the per-span path decides
            if one is not None:
                chunks.append(one)
                continue
            try:
                chunks.extend([_scope_rows_slow(s) for s in scopes])
            except MemoryError:
                raise
            except Exception as e:  # whatever it is, it is this block's alone
                errors[origin[b]] = _error(infos[b], e)
    return _table(chunks, infos)


def _table(chunks: list[dict[str, pa.Array]], infos: list[BlockInfo]) -> pa.Table:
    """The table of the span columns ``chunks`` and the metadata of their blocks ``infos``."""
    chunks = [c for c in chunks if len(c["start"])]
    if not chunks:
        return empty_table()
    if len(chunks) == 1:
        span_cols = chunks[0]
    else:
        span_cols = {k: pa.concat_arrays([c[k] for c in chunks]) for k in chunks[0]}
    n = len(span_cols["start"])
    block = span_cols["block"]

    def per_block(values: list[Any], typ: pa.DataType) -> pa.Array:
        if all(v == values[0] for v in values):
            return pa.repeat(pa.scalar(values[0], typ), n)
        return pa.array(values, typ).take(block)

    start_arr, end_arr = span_cols["start"], span_cols["end"]
    name_arr, msg_arr = span_cols["name"], span_cols["status_message"]
    if pc.any(pc.match_substring(name_arr, "\x00")).as_py():
        name_arr = pc.replace_substring(name_arr, "\x00", "\ufffd")
    if msg_arr.null_count < n and pc.any(pc.match_substring(msg_arr, "\x00")).as_py():
        msg_arr = pc.replace_substring(msg_arr, "\x00", "\ufffd")
    uuid16, utf8 = pa.binary(16), pa.utf8()
    cols: dict[str, pa.Array] = {
        "process_id": per_block([i.process_id.bytes for i in infos], uuid16),
        "stream_id": per_block([i.stream_id.bytes for i in infos], uuid16),
        "block_id": per_block([i.block_id.bytes for i in infos], uuid16),
        "insert_time": per_block([i.insert_time for i in infos], TIMESTAMP),
        "exe": per_block([i.exe for i in infos], utf8),
        "username": per_block([i.username for i in infos], utf8),
        "computer": per_block([i.computer for i in infos], utf8),
        "process_properties": per_block([i.process_properties for i in infos], utf8),
        "trace_id": _hex_ids(span_cols["trace_id"], 16),
        "span_id": _hex_ids(span_cols["span_id"], 8),
        "parent_span_id": _hex_ids(span_cols["parent"], 8),
        "start_time": _ns_to_timestamp(start_arr),
        "end_time": _ns_to_timestamp(end_arr),
        "duration": pc.subtract(end_arr, start_arr),
        "name": name_arr,
        "kind": pc.take(_KIND_DICT, span_cols["kind"]),
        "status": pc.take(_STATUS_DICT, span_cols["status"]),
        "status_message": msg_arr,
        "properties": span_cols["properties"],
        "events": span_cols["events"],
        "links": span_cols["links"],
        "service_name": per_block([i.service_name for i in infos], utf8),
    }
    return pa.Table.from_arrays([cols[c] for c in COLUMN_NAMES], schema=arrow_schema())
