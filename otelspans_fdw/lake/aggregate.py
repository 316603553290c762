"""Grouping, aggregates and top-N of ``otel_spans``, computed on the projected Arrow columns.

Our host offers a wrapper the query above its scan (see ``can_pushdown_upper`` in
:mod:`otelspans_fdw.multicorn_api` for the description).  PostgreSQL then rechecks nothing, so
this module answers exactly as PostgreSQL would:

* every WHERE condition is applied exactly here (the lake's scan filter is only a superset:
  the overlap window keeps spans crossing its edges);
* result types are PostgreSQL's: ``count`` bigint, ``sum(bigint)`` and ``avg(bigint)`` numeric
  (exact: sums are split into 32-bit halves so that nothing wraps, and ``avg`` is rounded to the
  scale PostgreSQL's numeric division picks), ``percentile_cont`` double precision with
  PostgreSQL's interpolation, ``percentile_disc`` the argument's type;
* NULLs: aggregates skip them, ``count(*)`` does not, NULL group keys form one group, an
  ungrouped aggregate over no rows is one row (``count`` 0, the others NULL);
* ordering is pushed by the host only for types (and collations) whose order Arrow shares;
  numeric outputs are ordered by their exact value.

Everything is vectorised with pyarrow compute; Python loops only over groups where PostgreSQL's
numeric formatting needs exact integers (``sum``/``avg``).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from otelspans_fdw.lake import topn
from otelspans_fdw.quals import ScanRequest
from otelspans_fdw.schema import COLUMN_NAMES, JSON_COLUMNS, column

__all__ = ["accepts", "answer", "columns_needed", "pg_numeric_avg"]

#: Scan callback: (request, columns) -> Arrow reader over the request's (superset of) rows.
Scan = Callable[[ScanRequest, list[str]], pa.RecordBatchReader]
#: (request, columns, key, descending, k) -> the rows holding the k best by key, or None.
TopScan = Callable[[ScanRequest, list[str], str, bool, int], pa.Table | None]

_FUNCTIONS = frozenset(
    {"count", "sum", "avg", "min", "max", "bool_or", "bool_and", "percentile_cont",
     "percentile_disc"}
)  # fmt: skip
_OPS = frozenset({"=", "<>", "<", "<=", ">", ">="})
#: Columns whose ordering comparisons mean the same in Arrow and PostgreSQL (not text: the
#: collation decides there, and a Qual does not say which).
_ORDERED_COLUMNS = frozenset({"duration", "start_time", "end_time", "insert_time"})
_TRUNC_UNITS = {
    "microseconds": "microsecond",
    "milliseconds": "millisecond",
    "second": "second",
    "minute": "minute",
    "hour": "hour",
    "day": "day",
    "week": "week",
    "month": "month",
    "quarter": "quarter",
    "year": "year",
}
_US = 1_000_000


# -- what is accepted (planning) ---------------------------------------------------------------


def _qual_ok(q: Any) -> bool:
    """Can this qual be applied exactly?  (Values are not known while planning.)"""
    name, op = q.field_name, q.operator
    if name not in COLUMN_NAMES or name in JSON_COLUMNS:
        return False
    if isinstance(op, tuple):
        return tuple(op) in {("=", True), ("<>", False)}
    if op not in _OPS:
        return False
    return op in {"=", "<>"} or name in _ORDERED_COLUMNS


def _routable(quals: Sequence[Any]) -> bool:
    """Does the request name processes, traces or a bounded window (as a scan must)?"""
    for q in quals:
        op = q.operator[0] if isinstance(q.operator, tuple) else q.operator
        if q.field_name in ("process_id", "trace_id") and op == "=":
            return True
        if q.field_name in ("start_time", "end_time") and op in ("=", ">", ">="):
            return True
    return False


def _cond_columns(cond: Any) -> set[str]:
    if cond is None:
        return set()
    tag = cond[0]
    if tag in ("and", "or"):
        out: set[str] = set()
        for c in cond[1]:
            out |= _cond_columns(c)
        return out
    if tag == "not":
        return _cond_columns(cond[1])
    if tag == "const":
        return set()
    return {cond[1]}


def columns_needed(query: dict[str, Any]) -> list[str]:
    """The columns the answer reads (quals, keys, aggregate arguments, filters, outputs)."""
    need = {q.field_name for q in query["quals"]}
    for k in query.get("group_by") or ():
        if "condition" in k:
            need |= _cond_columns(k["condition"])
        else:
            need.add(k["column"])
    for a in query.get("aggregates") or ():
        if a["column"]:
            need.add(a["column"])
        need |= _cond_columns(a["filter"]) | _cond_columns(a["argument"])
    need |= set(query.get("columns") or ())
    return [c for c in COLUMN_NAMES if c in need] or ["duration"]


def exact_quals(quals: Sequence[Any]) -> bool:
    """Can :func:`answer` apply every one of ``quals`` exactly (whatever the route)?"""
    return all(_qual_ok(q) for q in quals)


def accepts(query: dict[str, Any]) -> bool:
    """Whether :func:`answer` can answer ``query`` exactly."""
    quals = query["quals"]
    if not _routable(quals) or not all(_qual_ok(q) for q in quals):
        return False
    for a in query.get("aggregates") or ():
        if a["function"] not in _FUNCTIONS:
            return False
    for k in query.get("group_by") or ():
        if k.get("function") == "date_trunc" and k["unit"] not in _TRUNC_UNITS:
            return False
    return all(c in COLUMN_NAMES for c in columns_needed(query))


# -- conditions ----------------------------------------------------------------------------------


def _value(col: str, v: Any) -> Any:
    if isinstance(v, uuid.UUID):
        return v.bytes
    return v


def _scalar(col: str, v: Any) -> pa.Scalar:
    return pa.scalar(_value(col, v), type=column(col).arrow_type)


def _compare(arr: Any, op: str, s: pa.Scalar) -> Any:
    match op:
        case "=":
            return pc.equal(arr, s)
        case "<>":
            return pc.not_equal(arr, s)
        case "<":
            return pc.less(arr, s)
        case "<=":
            return pc.less_equal(arr, s)
        case ">":
            return pc.greater(arr, s)
        case ">=":
            return pc.greater_equal(arr, s)
    raise AssertionError(op)


def _in(arr: Any, col: str, values: Iterable[Any], negate: bool) -> Any:
    """``col = ANY(values)`` / ``col <> ALL(values)`` with SQL's NULLs."""
    vals = list(values)
    has_null = any(v is None for v in vals)
    t = column(col).arrow_type
    found = pc.is_in(arr, value_set=pa.array([_value(col, v) for v in vals if v is not None], t))
    res = pc.invert(found) if negate else found
    # NULL input -> NULL; not found in a list with a NULL -> NULL
    null = pa.scalar(None, pa.bool_())
    res = pc.if_else(pc.is_null(arr), null, res)
    if has_null:
        res = pc.if_else(found if not negate else pc.invert(found), res, null)
        if negate:
            res = pc.if_else(found, pa.scalar(False), null)
    return res


def _cond(table: pa.Table, cond: Any) -> Any:
    """A condition as a boolean array (NULL where SQL gives NULL)."""
    tag = cond[0]
    n = table.num_rows
    if tag == "const":
        return pa.array([cond[1]] * n, pa.bool_())
    if tag in ("and", "or"):
        parts = [_cond(table, c) for c in cond[1]]
        out = parts[0]
        for p in parts[1:]:
            out = pc.and_kleene(out, p) if tag == "and" else pc.or_kleene(out, p)
        return out
    if tag == "not":
        return pc.invert(_cond(table, cond[1]))
    arr = table.column(cond[1])
    if tag == "is_null":
        return pc.is_null(arr)
    if tag == "is_not_null":
        return pc.is_valid(arr)
    if tag == "cmp":
        if cond[3] is None:
            return pa.nulls(n, pa.bool_())
        return _compare(arr, cond[2], _scalar(cond[1], cond[3]))
    if tag in ("in", "not_in"):
        if cond[2] is None:
            return pa.nulls(n, pa.bool_())
        return _in(arr, cond[1], cond[2], tag == "not_in")
    raise AssertionError(f"unknown condition {tag!r}")


def _quals_mask(table: pa.Table, quals: Sequence[Any]) -> Any:
    """Every qual, exactly (IS NULL arrives as ('=', None), IS NOT NULL as ('<>', None))."""
    mask = None
    for q in quals:
        arr = table.column(q.field_name)
        op = q.operator
        if isinstance(op, tuple):
            m = _in(arr, q.field_name, q.value or [], negate=op[0] == "<>")
        elif q.value is None:
            m = pc.is_null(arr) if op == "=" else pc.is_valid(arr)
        else:
            m = _compare(arr, op, _scalar(q.field_name, q.value))
        mask = m if mask is None else pc.and_kleene(mask, m)
    return mask


# -- group keys ----------------------------------------------------------------------------------


def _micros(arr: Any) -> Any:
    return pc.cast(arr, pa.int64())


def _from_micros(arr: Any) -> Any:
    return pc.cast(arr, pa.timestamp("us", tz="UTC"))


def _group_key(table: pa.Table, key: dict[str, Any], utc_offset: int | None) -> Any:
    if "condition" in key:
        return _cond(table, key["condition"])
    arr = table.column(key["column"])
    fn = key.get("function")
    if fn is None:
        return arr
    us = _micros(arr)
    if fn == "date_trunc":
        unit = _TRUNC_UNITS[key["unit"]]
        shift = (utc_offset or 0) * _US
        local = pc.cast(pc.add(us, shift) if shift else us, pa.timestamp("us"))
        floored = _micros(pc.floor_temporal(local, unit=unit, week_starts_monday=True))
        return _from_micros(pc.subtract(floored, shift) if shift else floored)
    if fn == "date_bin":
        stride, origin = int(key["stride_us"]), int(key["origin_us"])
        diff = pc.subtract(us, origin)
        # floor((ts - origin) / stride) * stride, for either sign of ts - origin
        rem = pc.subtract(diff, pc.multiply(pc.divide(diff, stride), stride))
        rem = pc.if_else(pc.less(rem, 0), pc.add(rem, stride), rem)
        return _from_micros(pc.add(pc.subtract(diff, rem), origin))
    raise AssertionError(f"unknown group key {fn!r}")


# -- numeric formatting ----------------------------------------------------------------------


def _weight_first(x: int) -> tuple[int, int]:
    """Weight and first digit of |x| in PostgreSQL's base-10000 numeric digits."""
    x = abs(x)
    if x == 0:
        return 0, 0
    w = 0
    while x >= 10000 ** (w + 1):
        w += 1
    return w, x // 10000**w


def _decimal_text(rounded: int, scale: int) -> str:
    sign = "-" if rounded < 0 else ""
    s = str(abs(rounded))
    if scale == 0:
        return sign + s if rounded else "0"
    s = s.rjust(scale + 1, "0")
    return sign + s[:-scale] + "." + s[-scale:]


def pg_numeric_avg(total: int, count: int) -> str:
    """``total::numeric / count::numeric`` as PostgreSQL computes ``avg(bigint)``: the scale
    numeric division picks (at least 16 significant digits), rounded half away from zero."""
    w1, f1 = _weight_first(total)
    w2, f2 = _weight_first(count)
    qweight = w1 - w2
    if f1 <= f2:
        qweight -= 1
    rscale = min(max(16 - qweight * 4, 0), 1000)
    num = abs(total) * 10**rscale
    rounded = (2 * num + count) // (2 * count)
    if total < 0:
        rounded = -rounded
    return _decimal_text(rounded, rscale)


def _sum_fits(values: Any) -> bool:
    """Can no sum of these int64 values wrap?  (max |v| times their number < 2**63.)"""
    mm = pc.min_max(values).as_py()
    if mm["min"] is None:
        return True
    return max(abs(mm["min"]), abs(mm["max"])) * max(len(values), 1) < 2**63


def _exact_sums(hi: Any, lo: Any) -> list[int | None]:
    return [
        None if h is None else h * (1 << 32) + (l_ or 0)
        for h, l_ in zip(hi.to_pylist(), lo.to_pylist(), strict=True)
    ]


# -- aggregation -------------------------------------------------------------------------------


def _masked(values: Any, mask: Any | None) -> Any:
    """``values`` where the FILTER holds, NULL elsewhere (a NULL filter does not hold)."""
    if mask is None:
        return values
    return pc.if_else(pc.fill_null(mask, False), values, pa.scalar(None, values.type))


def _decode(arr: Any) -> Any:
    if pa.types.is_dictionary(arr.type):
        return pc.cast(arr, arr.type.value_type)
    return arr


def _array_text(values: list[Any]) -> str:
    parts = []
    for v in values:
        parts.append("NULL" if v is None else repr(float(v)) if isinstance(v, float) else str(v))
    return "{" + ",".join(parts) + "}"


class _Plan:
    """The pyarrow aggregations an aggregate needs and how to finish it from their results."""

    def __init__(self) -> None:
        self.inputs: dict[str, Any] = {}
        self.specs: list[tuple[Any, str, Any]] = []
        self.names: list[str] = []

    def add(self, values: Any | None, func: str, opts: Any = None) -> str:
        """Add one hash aggregation; the name of its result column."""
        if values is None:
            self.specs.append(([], func, opts))
        else:
            name = f"__in{len(self.inputs)}"
            self.inputs[name] = values
            self.specs.append((name, func, opts))
        out = f"__r{len(self.names)}"
        self.names.append(out)
        return out


#: Percentiles select per group (O(n) each) when groups are this few and this large on
#: average; else one sort of all values (a Python step per group would dominate).
_SELECT_GROUPS = 2000
_SELECT_MIN_AVG = 32


def _percentiles_by_group(
    lists: Any, fractions: list[float | None], cont: bool, value_type: pa.DataType
) -> list[Any]:
    """:func:`_percentiles` by selection in each group's values: PostgreSQL's rows (the
    ``floor``/``ceil`` of ``f * (n - 1)`` for cont, ``ceil(f * n)`` for disc) are picked with
    pyarrow's quantile at ``lower``/``higher``, and the interpolation is done here, as
    PostgreSQL does it (``lo + (f * (n - 1) - floor) * (hi - lo)``)."""
    out: list[list[Any]] = [[] for _ in fractions]
    as_int = pa.types.is_timestamp(value_type)
    for g in range(len(lists)):
        vals = lists[g].values
        if vals is None or len(vals) - vals.null_count == 0:
            for o in out:
                o.append(None)
            continue
        if as_int:
            vals = pc.cast(vals, pa.int64())
        n = len(vals) - vals.null_count
        for i, f in enumerate(fractions):
            if f is None:
                out[i].append(None)
                continue
            if cont:
                pos = f * (n - 1)
                first, second = math.floor(pos), math.ceil(pos)
                lo = pc.quantile(vals, q=[f], interpolation="lower")[0].as_py()
                if first == second:
                    out[i].append(lo)
                    continue
                hi = pc.quantile(vals, q=[f], interpolation="higher")[0].as_py()
                out[i].append(lo + (pos - first) * (hi - lo))
            else:
                row = max(math.ceil(f * n), 1) - 1  # 0-based row PostgreSQL returns
                q = 0.0 if n == 1 else (row + 0.5) / (n - 1)
                out[i].append(pc.quantile(vals, q=[min(q, 1.0)], interpolation="lower")[0].as_py())
    typ = pa.float64() if cont else value_type
    return [pa.array(o, pa.int64() if as_int and not cont else typ).cast(typ) for o in out]


def _percentiles(
    lists: Any, fractions: list[float | None], cont: bool, value_type: pa.DataType
) -> list[Any]:
    """Per group (a list of its values), the value at each fraction, as PostgreSQL picks it."""
    lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    ngroups = len(lists)
    if ngroups <= _SELECT_GROUPS and len(lists.values) >= _SELECT_MIN_AVG * ngroups:
        return _percentiles_by_group(lists, fractions, cont, value_type)
    parents = pc.list_parent_indices(lists)
    flat = pc.list_flatten(lists)
    valid = pc.is_valid(flat)
    parents, flat = pc.filter(parents, valid), pc.filter(flat, valid)
    order = pc.sort_indices(
        pa.table({"p": parents, "v": flat}), sort_keys=[("p", "ascending"), ("v", "ascending")]
    )
    srt = pc.take(flat, order)
    ngroups = len(lists)
    counts_tbl = pa.table({"p": parents}).group_by("p").aggregate([([], "count_all")])
    counts = [0] * ngroups
    for p, c in zip(
        counts_tbl.column("p").to_pylist(), counts_tbl.column("count_all").to_pylist(), strict=True
    ):
        counts[p] = c
    starts, acc = [], 0
    for c in counts:
        starts.append(acc)
        acc += c
    n = pa.array(counts, pa.int64())
    start = pa.array(starts, pa.int64())
    empty = pc.equal(n, 0)
    out = []
    for f in fractions:
        if f is None:
            out.append(pa.nulls(ngroups, pa.float64() if cont else value_type))
            continue
        if cont:
            pos = pc.multiply(pa.scalar(float(f)), pc.cast(pc.subtract(n, 1), pa.float64()))
            first = pc.floor(pos)
            second = pc.ceil(pos)
            prop = pc.subtract(pos, first)
            i1 = pc.add(start, pc.cast(first, pa.int64()))
            i2 = pc.add(start, pc.cast(second, pa.int64()))
            safe1 = pc.if_else(empty, 0, i1)
            safe2 = pc.if_else(empty, 0, i2)
            if len(srt) == 0:
                out.append(pa.nulls(ngroups, pa.float64()))
                continue
            lo = pc.cast(pc.take(srt, safe1), pa.float64())
            hi = pc.cast(pc.take(srt, safe2), pa.float64())
            # PostgreSQL: lo + proportion * (hi - lo), and lo itself when first == second
            val = pc.if_else(
                pc.equal(first, second), lo, pc.add(lo, pc.multiply(prop, pc.subtract(hi, lo)))
            )
            out.append(pc.if_else(empty, pa.scalar(None, pa.float64()), val))
        else:
            row = pc.cast(pc.ceil(pc.multiply(pa.scalar(float(f)), pc.cast(n, pa.float64()))),
                          pa.int64())  # fmt: skip
            row = pc.max_element_wise(row, 1)
            idx = pc.if_else(empty, 0, pc.add(start, pc.subtract(row, 1)))
            if len(srt) == 0:
                out.append(pa.nulls(ngroups, value_type))
                continue
            val = pc.take(srt, idx)
            out.append(pc.if_else(empty, pa.scalar(None, val.type), val))
    return out


def _aggregate(table: pa.Table, query: dict[str, Any], utc_offset: int | None) -> pa.Table:
    keys = query.get("group_by") or []
    aggs = query.get("aggregates") or []
    plan = _Plan()
    finish: list[Callable[[pa.Table], tuple[str, Any]]] = []

    def cols(name: str | None) -> Any:
        return _decode(table.column(name)) if name else None

    for a in aggs:
        out, fn = a["output"], a["function"]
        mask = _cond(table, a["filter"]) if a["filter"] is not None else None
        if fn == "count":
            if a["column"] is None:
                if mask is None:
                    r = plan.add(None, "count_all")
                else:
                    r = plan.add(pc.cast(pc.fill_null(mask, False), pa.int64()), "sum")
                    finish.append(lambda t, r=r, out=out: (out, pc.fill_null(t[r], 0)))
                    continue
            else:
                v = _masked(cols(a["column"]), mask)
                func = "count_distinct" if a["distinct"] else "count"
                r = plan.add(v, func, pc.CountOptions(mode="only_valid"))
            finish.append(lambda t, r=r, out=out: (out, pc.cast(t[r], pa.int64())))
        elif fn in ("sum", "avg"):
            v = _masked(cols(a["column"]), mask)
            rc = plan.add(v, "count", pc.CountOptions(mode="only_valid"))
            if _sum_fits(v):
                rh, rl = plan.add(v, "sum"), None
            else:
                # 32-bit halves: hi = v >> 32 (arithmetic), lo = v & 0xffffffff; neither
                # sum can wrap, and hi * 2**32 + lo is the exact total
                rh = plan.add(pc.shift_right(v, 32), "sum")
                rl = plan.add(pc.bit_wise_and(v, 0xFFFFFFFF), "sum")

            def fin(
                t: pa.Table,
                rh: str = rh,
                rl: str | None = rl,
                rc: str = rc,
                out: str = out,
                fn: str = fn,
            ) -> tuple[str, Any]:
                sums = t[rh].to_pylist() if rl is None else _exact_sums(t[rh], t[rl])
                counts = t[rc].to_pylist()
                text = [
                    None
                    if s is None or c == 0
                    else (str(s) if fn == "sum" else pg_numeric_avg(s, c))
                    for s, c in zip(sums, counts, strict=True)
                ]
                return out, pa.array(text, pa.utf8())

            finish.append(fin)
        elif fn in ("min", "max"):
            r = plan.add(_masked(cols(a["column"]), mask), fn)
            finish.append(lambda t, r=r, out=out: (out, t[r]))
        elif fn in ("bool_or", "bool_and"):
            v = _masked(_cond(table, a["argument"]), mask)
            r = plan.add(
                v,
                "any" if fn == "bool_or" else "all",
                pc.ScalarAggregateOptions(skip_nulls=True, min_count=1),
            )
            finish.append(lambda t, r=r, out=out: (out, t[r]))
        else:  # percentile_cont / percentile_disc
            src = cols(a["column"])
            cont = fn == "percentile_cont"
            # bigint -> double precision rounds, as PostgreSQL's cast does
            v = _masked(pc.cast(src, pa.float64(), safe=False) if cont else src, mask)
            r = plan.add(v, "list")
            rc = plan.add(v, "count", pc.CountOptions(mode="only_valid"))
            frac = a["fraction"]

            def fin_p(
                t: pa.Table,
                r: str = r,
                rc: str = rc,
                out: str = out,
                cont: bool = cont,
                frac: Any = frac,
                vtype: pa.DataType = v.type,
            ) -> tuple[str, Any]:
                fracs = frac if isinstance(frac, list) else [frac]
                res = _percentiles(t[r], fracs, cont, vtype)
                if not isinstance(frac, list):
                    return out, res[0]
                cols_ = [c.to_pylist() for c in res]
                rows = [[c[g] for c in cols_] for g in range(t.num_rows)]
                # a group without a value gives NULL, not an array of NULLs
                text = [
                    None if c == 0 else _array_text(row)
                    for row, c in zip(rows, t[rc].to_pylist(), strict=True)
                ]
                return out, pa.array(text, pa.utf8())

            finish.append(fin_p)

    key_names = [k["output"] for k in keys]
    data = {k["output"]: _group_key(table, k, utc_offset) for k in keys}
    data.update(plan.inputs)
    if not data:
        data["__none"] = pa.nulls(table.num_rows, pa.bool_())
    work = pa.table(data)
    specs = [(s[0], s[1], s[2]) if s[2] is not None else (s[0], s[1]) for s in plan.specs]
    grouped = work.group_by(key_names, use_threads=False).aggregate(specs)
    # results are the aggregations in spec order, around the keys (by name)
    agg_idx = [i for i, n in enumerate(grouped.column_names) if n not in key_names]
    res = {k: grouped.column(k) for k in key_names}
    res.update({plan.names[j]: grouped.column(i) for j, i in enumerate(agg_idx)})
    res["__rows"] = pa.nulls(grouped.num_rows, pa.bool_())
    res_tbl = pa.table(res)
    outputs = {k: res_tbl.column(k) for k in key_names}
    for f in finish:
        name, arr = f(res_tbl)
        outputs[name] = arr
    if not outputs:
        outputs["__rows"] = res_tbl.column("__rows")
    return pa.table(outputs)


# -- ordering and limit ------------------------------------------------------------------------


def _order_limit(
    table: pa.Table,
    order_by: Sequence[dict[str, Any]] | None,
    limit: int | None,
    offset: int,
    numeric: set[str],
) -> pa.Table:
    if order_by:
        if any(o["output"] in numeric for o in order_by):
            table = _python_sort(table, order_by, numeric)
        else:
            work: dict[str, Any] = {}
            keys: list[tuple[str, str]] = []
            for i, o in enumerate(order_by):
                arr = _decode(table.column(o["output"]))
                work[f"__n{i}"] = pc.is_null(arr)
                # NULLS FIRST: the null flag sorts true first
                keys.append((f"__n{i}", "descending" if o["nulls_first"] else "ascending"))
                work[f"__v{i}"] = arr
                keys.append((f"__v{i}", "descending" if o["descending"] else "ascending"))
            wt = pa.table(work)
            if limit is not None and limit + offset < table.num_rows:
                idx = pc.select_k_unstable(wt, k=limit + offset, sort_keys=keys)
            else:
                idx = pc.sort_indices(wt, sort_keys=keys)
            table = table.take(idx)
    if offset:
        table = table.slice(offset)
    if limit is not None:
        table = table.slice(0, limit)
    return table


def _python_sort(
    table: pa.Table, order_by: Sequence[dict[str, Any]], numeric: set[str]
) -> pa.Table:
    """Sort on exact values (numeric outputs are decimal text) with per-key NULL placement."""
    columns = []
    for o in order_by:
        vals = table.column(o["output"]).to_pylist()
        if o["output"] in numeric:
            vals = [None if v is None else Decimal(v) for v in vals]
        columns.append(vals)
    idx = list(range(table.num_rows))
    for o, vals in reversed(list(zip(order_by, columns, strict=True))):
        nonnull = [i for i in idx if vals[i] is not None]
        nulls = [i for i in idx if vals[i] is None]
        nonnull.sort(key=lambda i, v=vals: v[i], reverse=o["descending"])  # type: ignore[misc]
        idx = nulls + nonnull if o["nulls_first"] else nonnull + nulls
    return table.take(pa.array(idx, pa.int64()))


def _plain(table: pa.Table, keep: set[str]) -> pa.Table:
    """Dictionary columns decoded, except ``keep`` (group keys only: hashing the indices is
    about twice as fast), whose dictionaries are unified (they differ from file to file)."""
    for i, f in enumerate(table.schema):
        if pa.types.is_dictionary(f.type) and f.name not in keep:
            table = table.set_column(i, f.name, pc.cast(table.column(i), f.type.value_type))
    return table.unify_dictionaries() if keep else table


def _qual_columns(query: dict[str, Any]) -> set[str]:
    return {q.field_name for q in query["quals"]}


def _group_only_columns(query: dict[str, Any]) -> set[str]:
    """Columns used only as plain group keys (nothing compares or aggregates them)."""
    if not query.get("grouped"):
        return set(query.get("columns") or ()) - {o["output"] for o in query.get("order_by") or ()}
    keys = {k["column"] for k in query.get("group_by") or () if set(k) == {"output", "column"}}
    used = {q.field_name for q in query["quals"]}
    for k in query.get("group_by") or ():
        if set(k) != {"output", "column"}:
            used |= _cond_columns(k.get("condition")) | ({k["column"]} if "column" in k else set())
    for a in query.get("aggregates") or ():
        used |= {a["column"]} | _cond_columns(a["filter"]) | _cond_columns(a["argument"])
    return keys - used


# -- the answer --------------------------------------------------------------------------------


#: Largest LIMIT + OFFSET answered from the row groups that can hold it (beyond, the
#: candidates held would approach a full read anyway).
TOP_ROWS_MAX = 100


def _top_plan(query: dict[str, Any]) -> tuple[str, bool, int] | None:
    """(key, descending, k) when an ungrouped top-N may read only the row groups whose
    statistics reach its first sort key (:mod:`otelspans_fdw.lake.topn`)."""
    order_by, limit = query.get("order_by"), query.get("limit")
    if query.get("grouped") or query.get("matches_nothing") or not order_by or limit is None:
        return None
    k = int(limit) + int(query.get("offset") or 0)
    first = order_by[0]
    if first["output"] not in topn.KEYS or not 0 < k <= TOP_ROWS_MAX:
        return None
    return first["output"], bool(first["descending"]), k


def answer(
    query: dict[str, Any], req: ScanRequest, scan: Scan, top: TopScan | None = None
) -> pa.Table:
    """The query's result as an Arrow table with one field per output the host named.

    ``top``, when given, answers an ungrouped top-N from the row groups that can hold it; it
    returns None where it does not apply, and the plain ``scan`` reads everything."""
    cols = columns_needed(query)
    plan = _top_plan(query) if top is not None else None
    found = top(req, cols, *plan) if top is not None and plan is not None else None
    table = found if found is not None else scan(req, cols).read_all()
    table = _plain(table, _group_only_columns(query) - _qual_columns(query))
    if query.get("matches_nothing"):
        table = table.slice(0, 0)
    mask = _quals_mask(table, query["quals"])
    if mask is not None and not (mask.null_count == 0 and pc.all(mask).as_py() is not False):
        table = table.filter(mask)
    offset = int(query.get("offset") or 0)
    limit = query.get("limit")
    if not query.get("grouped"):
        out = table.select(list(query["columns"]))
        return _order_limit(out, query.get("order_by"), limit, offset, set())
    out = _aggregate(table, query, query.get("utc_offset"))
    numeric = {a["output"] for a in query.get("aggregates") or () if a["type"] == "numeric"}
    return _order_limit(out, query.get("order_by"), limit, offset, numeric)
