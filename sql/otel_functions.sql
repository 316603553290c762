
-- Trace functions (issue 6).  Both read otel_spans, so they see exactly what a query sees,
-- with the same just-in-time refresh: otel_trace through the trace index (trace_id), and
-- otel_service_map through a bounded time window (subject to the server's max_window).

-- One trace across services in tree order (children under their parent, siblings by start
-- time, then span id), with the depth and the root-to-span path of span ids.  Spans whose
-- parent never arrived are returned as roots of their own subtrees, marked orphan.  A span id
-- stored twice (the same span in two different requests) is returned once: the copy from the
-- earliest block.
CREATE FUNCTION otel_trace(p_trace_id text)
RETURNS TABLE (
    depth int, path text[], orphan boolean,
    span_id text, parent_span_id text, process_id uuid, service_name text, exe text,
    name text, kind text, status text, status_message text,
    start_time timestamptz, end_time timestamptz, duration bigint
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
)
SELECT t.depth, t.path, t.orphan,
       s.span_id, s.parent_span_id, s.process_id, s.service_name, s.exe, s.name, s.kind,
       s.status, s.status_message, s.start_time, s.end_time, s.duration
  FROM tree t
  JOIN spans s ON s.span_id = t.span_id
 ORDER BY t.sort_key
$fn$;

COMMENT ON FUNCTION otel_trace(text) IS
    'spans of one trace across services in tree order, with depth, path and orphans marked';

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
