"""JSON text of span properties, events and links, as the lake stores them.  No I/O.

The columns ``properties``, ``events`` and ``links`` are jsonb in SQL and JSON text in the
Parquet files; this module writes that text the way :func:`~otelspans_fdw.otlp.anyvalue_to_json`
says, compact, with U+0000 replaced (jsonb cannot hold it) and never a key twice (jsonb would
keep the last one, but other readers of the Parquet files may not).  Attribute fragments
``"key":value`` are cached across blocks by their serialized ``KeyValue``, because the same
attributes recur in almost every span and parsing them is most of the cost.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope, KeyValue

from otelspans_fdw.lake._lazy_pb import LazyEvent, LazyLink
from otelspans_fdw.otlp import anyvalue_to_json, attributes_to_dict, clean_text

__all__ = [
    "ATTRS",
    "attr_items",
    "event_json",
    "json_object",
    "json_str",
    "link_json",
    "scope_extras",
    "to_json",
]

_ENCODER = json.JSONEncoder(ensure_ascii=False, check_circular=False, separators=(",", ":"))
_encode: Callable[[Any], str] = _ENCODER.encode
_encode_str: Callable[[str], str] = json.encoder.encode_basestring  # C; ensure_ascii=False
_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def _strip_nul(obj: Any) -> Any:
    if isinstance(obj, str):
        return obj.replace("\x00", "\ufffd")
    if isinstance(obj, list):
        return [_strip_nul(x) for x in obj]
    if isinstance(obj, dict):
        return {_strip_nul(k): _strip_nul(v) for k, v in obj.items()}
    return obj


def json_str(text: str) -> str:
    """A JSON string literal, as :data:`_ENCODER` writes it (NUL replaced, see :func:`to_json`)."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    return _encode_str(text)


def to_json(obj: Any) -> str:
    """Compact JSON text that jsonb accepts (no ``\\u0000``)."""
    text = _encode(obj)
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        text = _encode(_strip_nul(obj))
    return text


def scope_extras(ss: Any) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    scope = InstrumentationScope.FromString(ss.scope) if ss.scope else InstrumentationScope()
    if scope.name:
        extras["otel.scope.name"] = scope.name
    if scope.version:
        extras["otel.scope.version"] = scope.version
    for k, v in attributes_to_dict(scope.attributes).items():
        extras[f"otel.scope.attr.{k}"] = v
    if ss.schema_url:
        extras["otel.scope.schema_url"] = ss.schema_url
    return extras


class _AttrCache:
    """Serialized ``KeyValue`` -> (key, JSON fragment ``"key":value``), shared across blocks.

    Bounded: cleared when it grows past :attr:`limit` entries (high-cardinality values such as
    ids would otherwise grow it forever); clearing only costs re-parsing.
    """

    limit = 200_000

    def __init__(self) -> None:
        self.map: dict[bytes, tuple[str, str]] = {}

    def miss(self, raw: bytes) -> tuple[str, str]:
        kv = KeyValue.FromString(raw)
        key = clean_text(kv.key)  # the key of the fragment's text, as the rules compare keys
        v = kv.value
        kind = v.WhichOneof("value")
        # Unique values (ids, times) miss every time: scalars skip the generic encoder.
        if kind == "string_value":
            item = (key, f"{json_str(key)}:{json_str(v.string_value)}")
        elif kind == "int_value":
            item = (key, f"{json_str(key)}:{v.int_value}")
        else:
            item = (key, to_json({key: anyvalue_to_json(v)})[1:-1])
        if len(self.map) >= self.limit:
            self.map.clear()
        self.map[raw] = item
        return item


ATTRS = _AttrCache()
_NAME_JSON: dict[str, str] = {}


def attr_items(raws: Sequence[bytes]) -> list[tuple[str, str]]:
    cache_get, cache_miss = ATTRS.map.get, ATTRS.miss
    return [cache_get(b) or cache_miss(b) for b in raws]


def json_object(items: list[tuple[str, str]], extras: dict[str, Any], prefix: str) -> str:
    """JSON object text: scope ``prefix`` then attribute fragments; dict semantics on repeats.

    A repeated key (within the attributes, or an attribute named like a scope extra) takes the
    slow path, so the text never holds duplicate keys (jsonb would keep the last one, but
    other readers of the Parquet files may not).
    """
    if len(items) > 1 or extras:
        keys = {k for k, _ in items}
        if len(keys) != len(items) or (extras and not keys.isdisjoint(extras)):
            d = dict(extras)
            for k, frag in items:
                d[k] = json.loads("{" + frag + "}")[k]
            return to_json(d)
    if prefix and items:
        prefix += ","
    return "{" + prefix + ",".join([f for _, f in items]) + "}"


def name_json(name: str) -> str:
    got = _NAME_JSON.get(name)
    if got is None:
        got = to_json(name)
        if len(_NAME_JSON) > 10_000:
            _NAME_JSON.clear()
        _NAME_JSON[name] = got
    return got


def event_json(raw: bytes) -> str:
    """One serialized ``Span.Event`` as ``{"name":..,"time":..,"attributes":{..}}``."""
    e = LazyEvent.FromString(raw)
    attrs = json_object(attr_items(e.attributes), {}, "")
    return f'{{"name":{name_json(e.name)},"time":{e.time_unix_nano},"attributes":{attrs}}}'


def link_json(raw: bytes) -> str:
    """One serialized ``Span.Link`` as ``{"trace_id":..,"span_id":..,"attributes":{..}}``."""
    lk = LazyLink.FromString(raw)
    attrs = json_object(attr_items(lk.attributes), {}, "")
    return (
        f'{{"trace_id":"{lk.trace_id.hex()}","span_id":"{lk.span_id.hex()}","attributes":{attrs}}}'
    )
