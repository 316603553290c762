"""``otelspans trace TRACE_ID``: one trace across services as a waterfall in the terminal.

The rows come from the SQL function ``otel_trace(trace_id)`` (tree order, depth, orphans
marked), so the terminal shows exactly what a SQL user gets; this module only draws.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["WaterfallSpan", "fetch_trace", "render_waterfall"]

BAR = "█"
TICK = "▏"


@dataclass(frozen=True)
class WaterfallSpan:
    """The columns of ``otel_trace`` that the waterfall draws."""

    depth: int
    orphan: bool
    service: str
    name: str
    status: str
    start_time: dt.datetime
    duration_ns: int


def fetch_trace(conn: object, trace_id: str) -> list[WaterfallSpan]:
    """Rows of ``otel_trace(trace_id)`` in tree order."""
    cur = conn.execute(  # type: ignore[attr-defined]
        "SELECT depth, orphan, coalesce(service_name, exe, '?'), name, status, start_time, "
        "duration FROM otel_trace(%s)",
        (trace_id,),
    )
    return [WaterfallSpan(*row) for row in cur.fetchall()]


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.2f} ms" if ns < 1e9 else f"{ns / 1e9:.3f} s"


def render_waterfall(trace_id: str, spans: Sequence[WaterfallSpan], width: int = 100) -> str:
    """The waterfall as text: one line per span, indented by depth, with a bar on a shared
    time axis; errors are marked ``!`` and orphans (parent never arrived) ``?`` (a two-character
    marker column, so an orphan that failed shows both).

    Offsets are from the trace's first start; bars are scaled to the trace's total extent, and
    a span of zero duration is drawn as a tick so that it never disappears."""
    if not spans:
        return f"trace {trace_id}: no spans\n"
    t0 = min(s.start_time for s in spans)
    end_ns = max(
        (s.start_time - t0) // dt.timedelta(microseconds=1) * 1000 + s.duration_ns for s in spans
    )
    total = max(end_ns, 1)
    services = sorted({s.service for s in spans})
    errors = sum(s.status == "ERROR" for s in spans)
    label_w = min(48, max(len("  " * s.depth + s.name) for s in spans) + 2)
    svc_w = min(24, max(len("service"), *(len(x) for x in services)))
    bar_w = max(10, width - label_w - svc_w - 26)

    lines = [
        f"trace {trace_id}: {len(spans)} spans, {len(services)} services, "
        f"{errors} errors, {_ms(total)}",
        f"{'service':<{svc_w}}   {'span':<{label_w}}{'offset':>10} {'duration':>11}  "
        f"{'|' + '-' * bar_w + '|'}",
    ]
    for s in spans:
        offset_ns = (s.start_time - t0) // dt.timedelta(microseconds=1) * 1000
        first = int(offset_ns * bar_w / total)
        length = max(1, round(s.duration_ns * bar_w / total))
        first = min(first, bar_w - 1)
        length = min(length, bar_w - first)
        bar = " " * first + (BAR * length if s.duration_ns else TICK)
        mark = ("!" if s.status == "ERROR" else " ") + ("?" if s.orphan else " ")
        label = ("  " * s.depth + s.name)[: label_w - 1]
        lines.append(
            f"{s.service[:svc_w]:<{svc_w}} {mark}{label:<{label_w}}{_ms(offset_ns):>10} "
            f"{_ms(s.duration_ns):>11}  |{bar:<{bar_w}}|"
        )
    lines.append("! error   ? orphan (its parent span never arrived)")
    return "\n".join(lines) + "\n"
