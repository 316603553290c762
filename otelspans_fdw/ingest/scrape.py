"""``otelspans status --receiver URL``: read a receiver's ``/metrics`` back into plain numbers.

Status reads the very endpoint Prometheus scrapes (no second bookkeeping that could disagree),
parsed with prometheus_client's own parser, and reshapes it per transport and reason.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from otelspans_fdw.exceptions import OtelSpansError
from otelspans_fdw.ingest.metrics import PREFIX, REQUEST_REASONS, SPAN_REASONS, TRANSPORTS

__all__ = ["format_summary", "metrics_url", "parse_metrics", "scrape"]

_PER_TRANSPORT = ("requests_accepted", "spans_accepted", "blocks_stored", "stored_bytes")
_PER_REASON = ("requests_rejected", "spans_rejected")
_LATENCY = "request_duration_seconds"


def metrics_url(url: str) -> str:
    """``http://host:4318`` -> ``http://host:4318/metrics``; an explicit path is kept."""
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.path in ("", "/"):
        parts = parts._replace(path="/metrics")
    return urllib.parse.urlunsplit(parts)


def _num(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


def _quantile_bound(buckets: list[tuple[float, float]], count: float, q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` (None without observations)."""
    if not count:
        return None
    for le, cum in sorted(buckets):
        if cum >= q * count:
            return le
    return math.inf


def parse_metrics(text: str) -> dict[str, Any]:
    """The receiver's metrics from Prometheus text, keyed without the ``otelspans_receiver_``."""
    out: dict[str, Any] = {k: {t: 0 for t in TRANSPORTS} for k in _PER_TRANSPORT}
    out["requests_rejected"] = {t: dict.fromkeys(REQUEST_REASONS, 0) for t in TRANSPORTS}
    out["spans_rejected"] = {t: dict.fromkeys(SPAN_REASONS, 0) for t in TRANSPORTS}
    lat: dict[str, dict[str, Any]] = {t: {"buckets": []} for t in TRANSPORTS}
    found = False
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith(PREFIX) or fam.name.endswith("_created"):
            continue  # _created: the counters' creation times (text format 0.0.4 families)
        found = True
        key = fam.name[len(PREFIX) :]
        for s in fam.samples:
            t = s.labels.get("transport")
            if key in _PER_TRANSPORT and s.name.endswith("_total"):
                out[key][t] = _num(s.value)
            elif key in _PER_REASON and s.name.endswith("_total"):
                out[key].setdefault(t, {})[s.labels["reason"]] = _num(s.value)
            elif key == _LATENCY and t is not None:
                if s.name.endswith("_bucket"):
                    lat[t]["buckets"].append((float(s.labels["le"]), s.value))
                elif s.name.endswith("_count"):
                    lat[t]["count"] = _num(s.value)
                elif s.name.endswith("_sum"):
                    lat[t]["sum"] = float(s.value)
            elif fam.type == "gauge":
                out[key] = _num(s.value)
    if not found:
        raise OtelSpansError("no otelspans receiver metrics in the response")
    out["latency"] = {}
    for t, h in lat.items():
        count = h.get("count", 0)
        out["latency"][t] = {
            "count": count,
            "sum_seconds": h.get("sum", 0.0),
            "p50_le_seconds": _quantile_bound(h["buckets"], count, 0.5),
            "p99_le_seconds": _quantile_bound(h["buckets"], count, 0.99),
        }
    return out


def scrape(url: str, timeout: float = 10.0) -> dict[str, Any]:
    """Fetch and parse a receiver's metrics; :class:`OtelSpansError` if it cannot be read."""
    full = metrics_url(url)
    try:
        with urllib.request.urlopen(full, timeout=timeout) as r:
            text = r.read().decode("utf-8")
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise OtelSpansError(
            f"cannot read receiver metrics at {full}: {e}",
            hint="Give the receiver's HTTP base URL (or its --metrics-port URL).",
        ) from e
    return {"url": full, **parse_metrics(text)}


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return "inf" if math.isinf(v) else f"{v * 1000:.1f}"


def format_summary(m: dict[str, Any]) -> list[str]:
    """Aligned text lines for ``otelspans status``: one column per transport."""
    rows: list[tuple[str, list[str]]] = []

    def per_t(label: str, values: dict[str, Any]) -> None:
        rows.append((label, [f"{values.get(t, 0):,}" for t in TRANSPORTS]))

    per_t("requests accepted", m["requests_accepted"])
    for r in REQUEST_REASONS:
        per_t(f"requests rejected {r}", {t: m["requests_rejected"][t][r] for t in TRANSPORTS})
    per_t("spans accepted", m["spans_accepted"])
    for r in SPAN_REASONS:
        per_t(f"spans rejected {r}", {t: m["spans_rejected"][t][r] for t in TRANSPORTS})
    per_t("blocks stored", m["blocks_stored"])
    per_t("bytes stored", m["stored_bytes"])
    lat = m["latency"]
    per_t("latency count", {t: lat[t]["count"] for t in TRANSPORTS})
    rows.append(
        (
            "latency mean ms",
            [
                _ms(lat[t]["sum_seconds"] / lat[t]["count"]) if lat[t]["count"] else "-"
                for t in TRANSPORTS
            ],
        )
    )
    rows.append(("latency p50 <= ms", [_ms(lat[t]["p50_le_seconds"]) for t in TRANSPORTS]))
    rows.append(("latency p99 <= ms", [_ms(lat[t]["p99_le_seconds"]) for t in TRANSPORTS]))
    lines = [f"receiver {m['url']}", f"{'':<40}" + "".join(f"{t:>14}" for t in TRANSPORTS)]
    lines += [f"{label:<40}" + "".join(f"{v:>14}" for v in vals) for label, vals in rows]
    lines.append(f"{'in flight requests':<40}{m.get('inflight_requests', 0):>14,}")
    lines.append(f"{'in flight bytes':<40}{m.get('inflight_bytes', 0):>14,}")
    return lines
