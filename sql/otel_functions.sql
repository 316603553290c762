
-- Trace functions (issue 6).  Both read otel_spans, so they see exactly what a query sees,
-- with the same just-in-time refresh: otel_trace through the trace index (trace_id), and
-- otel_service_map through a bounded time window (subject to the server's max_window).

-- One trace across services in tree order (children under their parent, siblings by start
-- time, then span id), with the depth and the root-to-span path of span ids.  Spans whose
-- parent never arrived are returned as roots of their own subtrees, marked orphan.  A span id
-- stored twice (the same span in two different requests) is returned once: the copy from the
-- earliest block.
-- Parent cycles (A -> B -> A, or a span that is its own parent) cannot be reached from a root:
-- each cycle is shown from one of its members (the lowest span id) as an extra root, and its
-- members have cycle = true, so that every span of the trace is returned, as otel_spans does.
CREATE FUNCTION otel_trace(p_trace_id text)
RETURNS TABLE (
    depth int, path text[], orphan boolean,
    span_id text, parent_span_id text, process_id uuid, service_name text, exe text,
    name text, kind text, status text, status_message text,
    start_time timestamptz, end_time timestamptz, duration bigint, cycle boolean
)
LANGUAGE sql STABLE
AS $fn$
WITH RECURSIVE spans AS MATERIALIZED (
    SELECT DISTINCT ON (s.span_id)
           s.span_id, s.parent_span_id, s.process_id, s.service_name, s.exe, s.name, s.kind,
           s.status, s.status_message, s.start_time, s.end_time, s.duration
      FROM @extschema@.otel_spans s
     WHERE s.trace_id = lower(p_trace_id)
     ORDER BY s.span_id, s.insert_time, s.block_id
), tree AS (
    SELECT r.span_id, 0 AS depth, ARRAY[r.span_id] AS path,
           ARRAY[to_char(r.start_time AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISSUS') || r.span_id]
               AS sort_key,
           (r.parent_span_id IS NOT NULL) AS orphan
      FROM spans r
     WHERE r.parent_span_id IS NULL
        OR NOT EXISTS (SELECT 1 FROM spans p WHERE p.span_id = r.parent_span_id)
    UNION ALL
    SELECT c.span_id, t.depth + 1, t.path || c.span_id,
           t.sort_key || (to_char(c.start_time AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISSUS')
                          || c.span_id),
           false
      FROM tree t
      JOIN spans c ON c.parent_span_id = t.span_id
     WHERE c.span_id <> ALL (t.path)
), unreached AS MATERIALIZED (
    -- Usually empty.  Every ancestor chain from here ends in a cycle (a missing parent
    -- would have made an orphan root).
    SELECT s.* FROM spans s WHERE NOT EXISTS (SELECT 1 FROM tree t WHERE t.span_id = s.span_id)
), up AS (
    -- Walk up from each unreached span; back at the start: it is in a cycle.
    SELECT u.span_id AS start, u.parent_span_id AS cur, ARRAY[u.span_id] AS seen
      FROM unreached u
    UNION ALL
    SELECT w.start, p.parent_span_id, w.seen || p.span_id
      FROM up w
      JOIN unreached p ON p.span_id = w.cur
     WHERE w.cur <> w.start AND p.span_id <> ALL (w.seen)
), members AS (
    SELECT w.start AS span_id, (SELECT min(x) FROM unnest(w.seen) x) AS entry
      FROM up w
     WHERE w.cur = w.start
), cycles AS (
    SELECT r.span_id, 0 AS depth, ARRAY[r.span_id] AS path,
           ARRAY[to_char(r.start_time AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISSUS') || r.span_id]
               AS sort_key,
           false AS orphan
      FROM unreached r
      JOIN members m ON m.span_id = r.span_id AND m.entry = r.span_id
    UNION ALL
    SELECT c.span_id, t.depth + 1, t.path || c.span_id,
           t.sort_key || (to_char(c.start_time AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISSUS')
                          || c.span_id),
           false
      FROM cycles t
      JOIN unreached c ON c.parent_span_id = t.span_id
     WHERE c.span_id <> ALL (t.path)
)
SELECT t.depth, t.path, t.orphan,
       s.span_id, s.parent_span_id, s.process_id, s.service_name, s.exe, s.name, s.kind,
       s.status, s.status_message, s.start_time, s.end_time, s.duration,
       EXISTS (SELECT 1 FROM members m WHERE m.span_id = t.span_id)
  FROM (SELECT * FROM tree UNION ALL SELECT * FROM cycles) t
  JOIN spans s ON s.span_id = t.span_id
 ORDER BY t.sort_key
$fn$;

COMMENT ON FUNCTION otel_trace(text) IS
    'spans of one trace across services in tree order, with depth, path, orphans and parent cycles marked';

-- Calls between services: parent/child span pairs of one trace whose processes differ, for
-- child spans starting in [p_begin, p_end].  Parents are looked up among the spans
-- overlapping the window (a parent contains its child's start, so it overlaps the window
-- whenever the child starts in it, clock skew aside).  Latencies are the callee spans'.
CREATE FUNCTION otel_service_map(p_begin timestamptz, p_end timestamptz)
RETURNS TABLE (
    caller text, callee text, calls bigint, errors bigint,
    p50_ms double precision, p95_ms double precision, p99_ms double precision
)
LANGUAGE sql STABLE
AS $fn$
WITH spans AS MATERIALIZED (
    SELECT s.process_id, coalesce(s.service_name, s.exe) AS service, s.trace_id, s.span_id,
           s.parent_span_id, s.status, s.duration, s.start_time
      FROM @extschema@.otel_spans s
     WHERE s.end_time >= p_begin AND s.start_time <= p_end
)
SELECT p.service, c.service, count(*), count(*) FILTER (WHERE c.status = 'ERROR'),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY c.duration) / 1e6,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY c.duration) / 1e6,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY c.duration) / 1e6
  FROM spans c
  JOIN spans p ON p.trace_id = c.trace_id AND p.span_id = c.parent_span_id
 WHERE p.process_id <> c.process_id
   AND c.start_time >= p_begin AND c.start_time <= p_end
 GROUP BY 1, 2
 ORDER BY 1, 2
$fn$;

COMMENT ON FUNCTION otel_service_map(timestamptz, timestamptz) IS
    'caller/callee services with call and error counts and latency percentiles';
